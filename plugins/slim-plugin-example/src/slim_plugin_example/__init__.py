"""Example slim plugin: the log-sum penalty, registered as ``logsum``.

slim finds it through the ``slim.penalties`` entry point, which imports
:mod:`slim_plugin_example.logsum`; nothing here needs to be imported by hand.
"""

__version__ = "0.1.0"
