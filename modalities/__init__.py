"""ditx's built-in modalities. Each subpackage registers its components on import and is
listed under the ``ditx.plugins`` entry-point group, exactly like a third-party plugin."""
