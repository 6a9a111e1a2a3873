"""The web console: logins (identity, login, accounts, ldap_login, throttle) and the app."""
