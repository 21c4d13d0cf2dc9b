// terna-grpc-client calls Terna's Unix-socket gRPC endpoints the way real
// grpc-go clients do: it dials the socket path itself as the target, with a
// unix context dialer and no WithAuthority, exactly like the kubelet's
// plugin registration client (pkg/kubelet/pluginmanager/operationexecutor,
// func dial). grpc-go then sends the socket path as :authority.
//
// Usage:
//
//	terna-grpc-client -registration SOCKET
//	terna-grpc-client -csi SOCKET [-node=false] [-controller]
//
// It prints what the server answered as one JSON object and exits non-zero
// on the first failed call.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

func dial(ctx context.Context, socket string) (*grpc.ClientConn, error) {
	//nolint:staticcheck // DialContext and WithBlock, as the kubelet uses them.
	return grpc.DialContext(ctx, socket,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}),
	)
}

func registration(ctx context.Context, conn *grpc.ClientConn) (map[string]any, error) {
	client := registerapi.NewRegistrationClient(conn)
	info, err := client.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		return nil, fmt.Errorf("GetInfo: %w", err)
	}
	if _, err := client.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		return nil, fmt.Errorf("NotifyRegistrationStatus: %w", err)
	}
	return map[string]any{
		"getInfo": map[string]any{
			"type":              info.Type,
			"name":              info.Name,
			"endpoint":          info.Endpoint,
			"supportedVersions": info.SupportedVersions,
		},
		"notifyRegistrationStatus": "ok",
	}, nil
}

func csiCalls(ctx context.Context, conn *grpc.ClientConn, withNode, controller bool) (map[string]any, error) {
	identity := csi.NewIdentityClient(conn)
	plugin, err := identity.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil {
		return nil, fmt.Errorf("GetPluginInfo: %w", err)
	}
	probe, err := identity.Probe(ctx, &csi.ProbeRequest{})
	if err != nil {
		return nil, fmt.Errorf("Probe: %w", err)
	}
	var ready any
	if probe.Ready != nil {
		ready = probe.Ready.Value
	}
	out := map[string]any{
		"pluginInfo": map[string]any{"name": plugin.Name, "vendorVersion": plugin.VendorVersion},
		"probe":      map[string]any{"ready": ready},
	}
	if withNode {
		if err := nodeCalls(ctx, conn, out); err != nil {
			return nil, err
		}
	}
	if controller {
		caps, err := csi.NewControllerClient(conn).ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
		if err != nil {
			return nil, fmt.Errorf("ControllerGetCapabilities: %w", err)
		}
		rpcs := []string{}
		for _, c := range caps.Capabilities {
			rpcs = append(rpcs, c.GetRpc().GetType().String())
		}
		out["controllerCapabilities"] = rpcs
	}
	return out, nil
}

func nodeCalls(ctx context.Context, conn *grpc.ClientConn, out map[string]any) error {
	node := csi.NewNodeClient(conn)
	nodeInfo, err := node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		return fmt.Errorf("NodeGetInfo: %w", err)
	}
	nodeCaps, err := node.NodeGetCapabilities(ctx, &csi.NodeGetCapabilitiesRequest{})
	if err != nil {
		return fmt.Errorf("NodeGetCapabilities: %w", err)
	}
	nodeRPCs := []string{}
	for _, c := range nodeCaps.Capabilities {
		nodeRPCs = append(nodeRPCs, c.GetRpc().GetType().String())
	}
	var topology map[string]string
	if t := nodeInfo.AccessibleTopology; t != nil {
		topology = t.Segments
	}
	out["nodeInfo"] = map[string]any{
		"nodeId":             nodeInfo.NodeId,
		"maxVolumesPerNode":  nodeInfo.MaxVolumesPerNode,
		"accessibleTopology": topology,
	}
	out["nodeCapabilities"] = nodeRPCs
	return nil
}

func main() {
	reg := flag.String("registration", "", "kubelet plugin registration socket to call")
	csiSocket := flag.String("csi", "", "CSI socket to call (Identity and Node)")
	withNode := flag.Bool("node", true, "call Node.NodeGetInfo and Node.NodeGetCapabilities on -csi")
	controller := flag.Bool("controller", false, "also call Controller.ControllerGetCapabilities on -csi")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline for dialing and all calls")
	flag.Parse()
	if (*reg == "") == (*csiSocket == "") {
		fmt.Fprintln(os.Stderr, "give exactly one of -registration and -csi")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	socket := *reg + *csiSocket
	conn, err := dial(ctx, socket)
	if err != nil {
		fmt.Fprintf(os.Stderr, "dial %s: %v\n", socket, err)
		os.Exit(1)
	}
	defer conn.Close()
	var out map[string]any
	if *reg != "" {
		out, err = registration(ctx, conn)
	} else {
		out, err = csiCalls(ctx, conn, *withNode, *controller)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", socket, err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
