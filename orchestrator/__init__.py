"""difflabel's control plane: the Click CLI, settings, sources and (later) job state.

Never imports torch at module level, so commands that only read state answer at once.
"""
