"""KServe v2 / Triton ``GRPCInferenceService`` protobuf modules, for the test server.

Origin: ``grpc_service.proto`` and the ``model_config.proto`` it imports are the
published files of https://github.com/triton-inference-server/common,
``protobuf/`` at commit 83adf7cf88a2f343005974dff3728be746de2d66 (package
``inference``, the KServe v2 gRPC predict protocol plus Triton's extensions),
copied unchanged beside this file.

Generated with grpcio-tools 1.85.1 (protoc for protobuf 7.35)::

    cd tests/servers/kserve_pb
    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. grpc_service.proto model_config.proto

then edited in three ways only: the generated top-level imports
(``import model_config_pb2``, ``import grpc_service_pb2``) made package-relative,
a ``# ruff: noqa`` / ``# mypy: ignore-errors`` header on each generated file, and
the empty ``model_config_pb2_grpc.py`` removed.

Import these modules only in a process that does not also import
``tritonclient.grpc``: both register ``inference.*`` in protobuf's default
descriptor pool, and the second registration fails. The test server runs in its
own process for this reason.
"""
