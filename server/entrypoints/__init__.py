"""HTTP route modules added to the app by `server.entrypoints.http_server.build_app`."""
