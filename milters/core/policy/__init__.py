"""Config and policy loading: YAML with positions, a small schema language, address matching."""
