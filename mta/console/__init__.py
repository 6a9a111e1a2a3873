"""The web console: logins (identity, login, accounts, ldap_login, throttle) and the app
(app, pages, api, context, sessions, security, i18n, server, process): held mail, the audit
log and the overview as pages and a JSON API over the operations the CLI uses."""
