"""Root conftest: loads the harness's pytest plugin in a checkout where the package is not installed.

When the package is installed (bin/bootstrap installs it), the `qoe_harness` pytest11 entry
point has loaded the plugin already, and loading it twice would be an error.
"""

from importlib.metadata import entry_points

_installed = any(ep.value == "harness.pytest_plugin" for ep in entry_points(group="pytest11"))
pytest_plugins = [] if _installed else ["harness.pytest_plugin"]
