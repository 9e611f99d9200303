"""ditx's shipped recipes (YAML files under ``recipes/<modality>/``), installed as package data."""
