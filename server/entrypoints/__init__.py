"""HTTP route modules added to the app by `server.http_server.build_app`."""
