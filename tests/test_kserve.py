"""KServe v2 model names from captured gRPC messages (agent/kserve.py).

Messages are encoded by the generated code that ships with PyPI's
``tritonclient`` (the same ``grpc_service.proto``), not by anything written
here; the reader must agree with protobuf's own parser on every prefix.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from agent import kserve
from agent.http2 import H2Stream

PATH = "/inference.GRPCInferenceService/"


def infer_request(model: str, n: int = 4) -> bytes:
    req = pb.ModelInferRequest(model_name=model, model_version="1", id="req-7")
    req.parameters["priority"].uint64_param = 3
    req.parameters["sequence_start"].bool_param = True
    inp = req.inputs.add(name="INPUT0", datatype="INT32", shape=[1, n])
    inp.parameters["binary_data_size"].int64_param = 4 * n
    req.raw_input_contents.append(bytes(range(256)) * (n // 64 + 1))
    return req.SerializeToString()


def stream(method: str, request: bytes, response: bytes = b"", compressed: bool = False) -> H2Stream:
    return H2Stream(
        stream_id=1,
        method="POST",
        path=PATH + method,
        authority=None,
        content_type="application/grpc",
        status=200,
        grpc_status=0,
        grpc_message=None,
        request_start_ns=1,
        response_first_ns=2,
        first_message_ns=2,
        last_message_ns=2,
        end_ns=3,
        end_reason="end_stream",
        reset_code=None,
        request_messages=1,
        response_messages=1,
        request_bytes=len(request),
        response_bytes=len(response),
        request_compressed=compressed,
        response_compressed=False,
        headers_lost=False,
        messages_lost=False,
        rpc_system="grpc",
        rpc_service="inference.GRPCInferenceService",
        rpc_method=method,
        request_message=request,
        response_message=response,
    )


def test_model_name_of_requests_and_responses() -> None:
    assert kserve.model_name(infer_request("llama-3-8b")) == "llama-3-8b"
    resp = pb.ModelInferResponse(model_name="llama-3-8b", model_version="1", id="req-7")
    resp.outputs.add(name="OUTPUT0", datatype="BYTES", shape=[1])
    resp.raw_output_contents.append(b"\x05\x00\x00\x00hello")
    assert kserve.model_name(resp.SerializeToString()) == "llama-3-8b"
    sresp = pb.ModelStreamInferResponse(error_message="", infer_response=resp)
    assert kserve.stream_response_model(sresp.SerializeToString()) == "llama-3-8b"
    assert kserve.response_model(sresp.SerializeToString(), "ModelStreamInfer") == "llama-3-8b"
    assert kserve.response_model(resp.SerializeToString(), "ModelInfer") == "llama-3-8b"
    assert kserve.response_model(resp.SerializeToString(), "ModelReady") is None


def test_the_last_occurrence_wins_as_in_protobuf() -> None:
    # Concatenated messages merge (protobuf encoding spec); the last model_name wins.
    merged = infer_request("first") + pb.ModelInferRequest(model_name="second").SerializeToString()
    parsed = pb.ModelInferRequest()
    parsed.ParseFromString(merged)
    assert kserve.model_name(merged) == parsed.model_name == "second"
    # A name placed after other fields (any field order is valid on the wire).
    tail_first = pb.ModelInferRequest(id="x").SerializeToString() + b"\x0a\x03abc"
    assert kserve.model_name(tail_first) == "abc"


def test_every_prefix_gives_the_name_or_none() -> None:
    msg = infer_request("mistral-7b-instruct", n=64)
    name_end = 2 + len("mistral-7b-instruct")
    for k in range(len(msg) + 1):
        got = kserve.model_name(msg[:k])
        assert got == ("mistral-7b-instruct" if k >= name_end else None), k


def test_stream_records_of_kserve_rpcs() -> None:
    req = infer_request("m1")
    resp = pb.ModelStreamInferResponse(
        infer_response=pb.ModelInferResponse(model_name="m1")
    ).SerializeToString()
    assert kserve.stream_model(stream("ModelStreamInfer", req, resp)) == ("m1", "m1")
    assert kserve.request_model(stream("ModelInfer", req)) == "m1"
    # Not an inference RPC, or a compressed message whose bytes are not protobuf.
    ready = pb.ModelReadyRequest(name="m1").SerializeToString()
    assert kserve.request_model(stream("ModelReady", ready)) is None
    assert kserve.request_model(stream("ModelInfer", req, compressed=True)) is None
    assert kserve.stream_model(stream("ServerLive", b"")) == (None, None)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x0a",  # tag, no length
        b"\x0a\x05ab",  # length beyond the capture
        b"\x0a\x00",  # empty name
        b"\x0a\x02\xff\xfe",  # not UTF-8
        b"\x0b\x00",  # a group start: not this protocol
        b"\x00\x01",  # field 0 does not exist
        b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # an over-long varint
        b"\x0a" + b"\x81\x08" + b"x" * 1025,  # a 1025-byte name is refused by the bound
    ],
)
def test_malformed_or_cut_messages_give_none(raw: bytes) -> None:
    assert kserve.model_name(raw) is None


@settings(max_examples=300, deadline=None)
@given(
    model=st.text(max_size=80),
    rid=st.text(max_size=20),
    n=st.integers(1, 300),
    cut=st.integers(0, 4000),
)
def test_agrees_with_protobuf(model: str, rid: str, n: int, cut: int) -> None:
    req = pb.ModelInferRequest(model_name=model, id=rid)
    req.raw_input_contents.append(b"\x0a\x05evil!" * n)  # name-like bytes inside another field
    data = req.SerializeToString()
    assert kserve.model_name(data) == (model or None)
    cut_data = data[:cut]
    got = kserve.model_name(cut_data)
    assert got is None or got == model


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_raise(raw: bytes) -> None:
    name = kserve.model_name(raw)
    assert name is None or len(name.encode()) <= 1024
    kserve.stream_response_model(raw)
