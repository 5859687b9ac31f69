"""Prefect orchestration of the EdgeSAM stages (no ML logic here): flows, caching, deployments."""
