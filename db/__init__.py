"""The data: models of the app's tables and the worker's own, sessions, services, migrations."""
