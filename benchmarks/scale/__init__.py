"""Scale benchmark: the exporter process against real servers holding N users.

One seeded generator (:mod:`.estate`) decides every user's fate across Active Directory (an
AD-shaped OpenLDAP, :mod:`.slapd`), ConfigMgr (PostgreSQL through the ``PostgreSQL Unicode`` ODBC
driver, :mod:`.cmdb`) and Entra ID (the Graph simulator, :mod:`.graph`), and writes the stage counts
the exporter must report. The driver (:mod:`.run`) starts the exporter as a subprocess and measures
it from the outside (/proc, HTTP, the servers' own counters). See docs/scale.md.

    python -m benchmarks.scale run --users 100000
"""
