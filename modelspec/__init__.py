"""The model contract shared by the worker and the model tooling: the manifest of a version
directory, the model spec (input, preprocessing, output) and the one function that turns image
bytes into a model input as the spec says. Imports neither TensorFlow nor OpenVINO, and nothing
from `worker` or `modelkit`: both import it.
"""
