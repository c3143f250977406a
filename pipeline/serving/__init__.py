"""serving: `pipeline serve`, the local captioning page (server.py, uploads.py, assets/)."""
