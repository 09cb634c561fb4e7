"""Command-line tools: generation, the demo, (later) conversion, plotting and planning."""
