"""The cookiecutter app's views, which docs/testing.rst imports as
``myapp.views.default``."""

from tests.pkgs.cookiecutter_app.views.default import checkout, place_order

__all__ = ["checkout", "place_order"]
