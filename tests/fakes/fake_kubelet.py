"""A fake kubelet pod-resources server: real grpcio on a unix socket, the kubelet's v1 API.

The code under test connects to it exactly as to a kubelet's
``/var/lib/kubelet/pod-resources/kubelet.sock``. Tests set what it reports
(``pods``, ``allocatable``) and may make ``GetAllocatableResources`` answer
UNIMPLEMENTED, as kubelets before 1.23 do.

Thread-safe: attributes are read by gRPC worker threads; tests replace them whole.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent import futures

import grpc

from collectors.podresources import api_pb2, api_pb2_grpc

Devices = dict[str, list[str]]
"""resource name → device IDs."""


def pod_resources(namespace: str, name: str, containers: dict[str, Devices]) -> api_pb2.PodResources:
    """A PodResources entry: container name → {resource name: [device IDs]}."""
    return api_pb2.PodResources(
        namespace=namespace,
        name=name,
        containers=[
            api_pb2.ContainerResources(
                name=cname,
                devices=[
                    api_pb2.ContainerDevices(
                        resource_name=resource,
                        device_ids=ids,
                        topology=api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=0)]),
                    )
                    for resource, ids in devices.items()
                ],
                cpu_ids=[2, 3],
                memory=[api_pb2.ContainerMemory(memory_type="hugepages-2Mi", size=2 << 20)],
            )
            for cname, devices in containers.items()
        ],
    )


class FakeKubelet(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.pods: list[api_pb2.PodResources] = []
        self.allocatable: Devices = {}
        self.allocatable_unimplemented = False
        self.calls: Counter[str] = Counter()
        self._server: grpc.Server | None = None

    def List(self, request: api_pb2.ListPodResourcesRequest, context: grpc.ServicerContext) -> api_pb2.ListPodResourcesResponse:
        self.calls["List"] += 1
        return api_pb2.ListPodResourcesResponse(pod_resources=list(self.pods))

    def GetAllocatableResources(
        self, request: api_pb2.AllocatableResourcesRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocatableResourcesResponse:
        self.calls["GetAllocatableResources"] += 1
        if self.allocatable_unimplemented:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "unknown method GetAllocatableResources")
        return api_pb2.AllocatableResourcesResponse(
            devices=[api_pb2.ContainerDevices(resource_name=r, device_ids=ids) for r, ids in self.allocatable.items()],
            cpu_ids=[0, 1, 2, 3],
        )

    def Get(self, request: api_pb2.GetPodResourcesRequest, context: grpc.ServicerContext) -> api_pb2.GetPodResourcesResponse:
        self.calls["Get"] += 1
        for pod in self.pods:
            if pod.namespace == request.pod_namespace and pod.name == request.pod_name:
                return api_pb2.GetPodResourcesResponse(pod_resources=pod)
        context.abort(grpc.StatusCode.NOT_FOUND, f"pod {request.pod_namespace}/{request.pod_name} not found")
        raise AssertionError("unreachable")  # abort raises

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(self, server)
        if server.add_insecure_port("unix:" + os.path.abspath(self.socket_path)) == 0:
            raise RuntimeError(f"cannot listen on {self.socket_path}")
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        # The kubelet removes its socket when it exits; so does this fake.
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
