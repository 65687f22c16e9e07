"""Pure fleet-wide logic: exact merging of windows, fleet drift views, alert lifecycle.

Nothing here touches sockets, files or clocks: data and time come in as arguments.
"""
