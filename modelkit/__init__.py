"""Model side of the project: demo dataset, training, export and the manifest contract.

A model version is one directory `<models_root>/<name>/<version>/` (TF Serving layout) holding
the SavedModel, OpenVINO IRs and `manifest.json`. Importing this package is cheap: TensorFlow and
OpenVINO are imported only by the modules that train and export.
"""
