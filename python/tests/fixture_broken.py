"""An application that cannot be imported."""

raise ImportError("fixture_broken: this application does not load")
