"""Layer 4 of fxrelay: model files and the model zoo (``save``/``load``, ``load_model``), below the apps."""
