"""Deployment: prediction, export, the optimised CPU inference engine and the HTTP server."""
