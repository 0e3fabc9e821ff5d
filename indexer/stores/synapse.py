"""The `synapse` preset of the SQL store: queries for Synapse's own database (PostgreSQL or SQLite).

Written for Synapse's current schema: `users` (name is the full user id; deactivated, is_guest and
appservice_id select who is left out), `profiles` (user_id is the localpart, displayname),
`user_threepids` (user_id is the full user id; added_at in milliseconds; msisdn addresses are
international digits without "+", which is added so they are not read as national numbers). `:domain` is matrix.domain.
Every query can be overridden one by one in the store's `queries`.

Changes are found by time: a user created, or a 3PID added, after the mark. Synapse keeps no time
for deactivations, renames or removed 3PIDs, so those arrive with the next full sync.
"""

from __future__ import annotations

_PEOPLE = """
SELECT u.name AS id,
       CASE WHEN u.deactivated = 0 AND u.is_guest = 0 AND u.appservice_id IS NULL THEN u.name END AS user_id,
       p.displayname AS display_name,
       t.medium AS medium,
       CASE WHEN t.medium = 'msisdn' THEN '+' || t.address ELSE t.address END AS address,
       CASE WHEN COALESCE(t.added_at, 0) > COALESCE(u.creation_ts, 0) * 1000
            THEN t.added_at ELSE COALESCE(u.creation_ts, 0) * 1000 END AS mark
FROM users u
LEFT JOIN profiles p ON u.name = '@' || p.user_id || ':' || :domain
LEFT JOIN user_threepids t ON t.user_id = u.name
"""

QUERIES = {
    "identities": _PEOPLE + "WHERE u.deactivated = 0 AND u.is_guest = 0 AND u.appservice_id IS NULL",
    "changes": _PEOPLE + """WHERE u.name IN (
    SELECT name FROM users WHERE COALESCE(creation_ts, 0) * 1000 > :since
    UNION SELECT user_id FROM user_threepids WHERE added_at > :since)""",
    "high_water_mark": """
SELECT COALESCE(MAX(m), 0) FROM (
    SELECT MAX(creation_ts) * 1000 AS m FROM users
    UNION ALL SELECT MAX(added_at) AS m FROM user_threepids) AS marks""",
    "password": "SELECT password_hash FROM users WHERE name = :id",
}

# Synapse normalises passwords to NFKC before hashing with bcrypt (and its optional pepper).
PASSWORD = {"normalize": "NFKC"}
