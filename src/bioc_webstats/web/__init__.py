"""The web side: URLs, pages and text files, the published site on disk, the Flask app and
its gunicorn configuration."""
