"""A fourth modality from outside ditx: 1-D signals (registration only).

``pip install -e examples/signals`` and ``ditx train examples/signals/signals.yaml``. The
components live in ``ditx_signals.signals`` and are imported when a recipe asks for them.
"""

from ditx import registry

signals = registry.declare_modality("signals", distribution="ditx-signals")
signals.register(registry.tokenizers, "signal-patches", "ditx_signals.signals:SignalPatchTokenizer")
signals.register(registry.datasets, "sine-waves", "ditx_signals.signals:SineWaves")
signals.register(registry.metrics, "dominant-frequency", "ditx_signals.signals:DominantFrequencyMetric")
signals.register(registry.writers, "signals", "ditx_signals.signals:write_signal_samples")
