"""nbtune's notebook UI: the config builder, the memory panel and the live training dashboard.

Widgets are thin views over engine objects (a TuneConfig, a Run, a MemoryEstimate); all logic lives in nbtune/.
"""
