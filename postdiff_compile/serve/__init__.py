"""Serving compiled artifacts over HTTP with Ray Serve (`postdiff-compile serve`): requests.py checks what clients
send, app.py is the Ray Serve application."""
