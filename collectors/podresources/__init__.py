"""The kubelet's pod-resources API (v1), as generated Python modules.

``api.proto`` is the kubelet's published definition, unchanged; ``api_pb2*.py``
are generated from it. See ``README.md`` here for how to regenerate them.
"""
