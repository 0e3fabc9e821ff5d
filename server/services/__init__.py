"""The service layer: what the HTTP handlers call (sessions, binding, invites, accounts, terms,
lookups, directory search)."""
