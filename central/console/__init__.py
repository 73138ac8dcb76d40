"""The platform console: `citygw platform serve`, an HTTP API and a web page over the store
(app.py), its users and sessions (auth.py), live updates (live.py), the vital signs
(vitals.py) and its config file (config.py)."""
