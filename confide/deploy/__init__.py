"""Deployment with Flower's own SuperLink and SuperNodes: keys and certificates, launchers
with TLS and node authentication by default, and signed app bundles."""
