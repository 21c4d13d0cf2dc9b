"""Calls Terna's Unix-socket gRPC endpoints as grpc-python does by default:
grpc.insecure_channel("unix:" + path), no authority override.

Usage:
    client.py --stubs DIR --csi SOCKET
    client.py --stubs DIR --registration SOCKET

DIR holds the modules grpcio-tools generated from proto/ (csi_pb2 and
pluginregistration_pb2, with their _grpc modules); scripts/install-test-tools
writes them to .tools/python-stubs. Prints what the server answered as one
JSON object; exits non-zero on the first failed call.
"""

import argparse
import json
import sys


def csi_calls(channel):
    import csi_pb2
    import csi_pb2_grpc

    identity = csi_pb2_grpc.IdentityStub(channel)
    node = csi_pb2_grpc.NodeStub(channel)
    plugin = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
    probe = identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
    info = node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
    return {
        "pluginInfo": {"name": plugin.name, "vendorVersion": plugin.vendor_version},
        "probe": {"ready": probe.ready.value if probe.HasField("ready") else None},
        "nodeInfo": {
            "nodeId": info.node_id,
            "accessibleTopology": dict(info.accessible_topology.segments),
        },
    }


def registration_calls(channel):
    import pluginregistration_pb2 as pb
    import pluginregistration_pb2_grpc as pb_grpc

    client = pb_grpc.RegistrationStub(channel)
    info = client.GetInfo(pb.InfoRequest(), timeout=10)
    client.NotifyRegistrationStatus(pb.RegistrationStatus(plugin_registered=True), timeout=10)
    return {
        "getInfo": {
            "type": info.type,
            "name": info.name,
            "endpoint": info.endpoint,
            "supportedVersions": list(info.supported_versions),
        },
        "notifyRegistrationStatus": "ok",
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stubs", required=True)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--csi")
    which.add_argument("--registration")
    args = parser.parse_args()
    sys.path.insert(0, args.stubs)
    import grpc

    socket = args.csi or args.registration
    with grpc.insecure_channel("unix:" + socket) as channel:
        try:
            out = csi_calls(channel) if args.csi else registration_calls(channel)
        except grpc.RpcError as e:
            print(f"{socket}: {e.code()}: {e.details()}", file=sys.stderr)
            sys.exit(1)
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
