// kubelet-dial: a gRPC client built on grpc-go (Debian's golang-google-grpc-dev), dialing a
// plugin socket the way one of the kubelet's clients does. It is a peer we did not write:
// hybridlet's tests drive it to prove that the sockets serve real grpc-go clients.
//
// It needs no generated stubs: a pass-through codec sends the request bytes the caller
// gives and returns the response bytes, so the caller (a Rust test) encodes and decodes.
//
//	kubelet-dial -socket PATH -dial MODE [-authority FORM]
//
// MODE is the kubelet client to mirror (kubernetes/kubernetes):
//
//	watcher  pkg/kubelet/pluginmanager/operationexecutor/operation_generator.go dial():
//	         grpc.DialContext(ctx, path, WithInsecure, WithBlock, WithContextDialer(unix)),
//	         10 s dial timeout. Every release registers plugins this way.
//	dra-old  pkg/kubelet/cm/dra/plugin (until about 1.32): grpc.Dial(path, insecure,
//	         WithContextDialer(unix)), then wait up to 1 s for the connection.
//	dra-new  pkg/kubelet/cm/dra/plugin (1.33+): grpc.NewClient("unix:"+path, insecure).
//	         grpc-go 1.33 has no NewClient; grpc.Dial("unix:"+path) sends the same
//	         :authority (localhost) and dials the same socket.
//	csi      pkg/volume/csi/csi_client.go newGrpcConn(): grpc.Dial(path,
//	         WithAuthority("localhost"), insecure, WithContextDialer(unix)).
//
// FORM overrides the :authority grpc-go would send (only with watcher and dra-old):
//
//	default  what this grpc-go sends for a bare path: the path itself
//	percent  the path percent-encoded, as grpc-go 1.55+ sends it (RFC 3986: "/" -> "%2F")
//	=VALUE   VALUE verbatim
//
// Calls are read from stdin, one JSON object per line:
//
//	{"method": "/pkg.Service/Method", "request": "<base64>", "stream": 0, "timeout_ms": 5000}
//
// "stream": N > 0 makes it a server-streaming call that reads N messages, then cancels.
// Each call answers one JSON line on stdout:
//
//	{"code": 0, "message": "", "responses": ["<base64>", ...]}
//
// The exit status is 0 when every line was answered (whatever the gRPC codes), 2 on bad
// usage, 1 when the dial itself failed.
package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"
)

// rawCodec passes bytes through. Named "proto" so the content-type stays application/grpc.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("rawCodec: unexpected %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: unexpected %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

type call struct {
	Method    string `json:"method"`
	Request   string `json:"request"`
	Stream    int    `json:"stream"`
	TimeoutMs int    `json:"timeout_ms"`
}

type answer struct {
	Code      uint32   `json:"code"`
	Message   string   `json:"message"`
	Responses []string `json:"responses"`
}

func unixDialer(ctx context.Context, addr string) (net.Conn, error) {
	return (&net.Dialer{}).DialContext(ctx, "unix", addr)
}

// encodeAuthority percent-encodes what RFC 3986 does not allow unescaped in an authority,
// as grpc-go 1.55+ does for a passthrough target's endpoint.
func encodeAuthority(s string) string {
	const allowed = "-._~!$&'()*+,;=:[]@"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte(allowed, c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

func dial(socket, mode, authority string) (*grpc.ClientConn, error) {
	var override []grpc.DialOption
	switch {
	case authority == "default":
	case authority == "percent":
		override = append(override, grpc.WithAuthority(encodeAuthority(socket)))
	case strings.HasPrefix(authority, "="):
		override = append(override, grpc.WithAuthority(authority[1:]))
	default:
		return nil, fmt.Errorf("unknown -authority %q", authority)
	}
	if len(override) > 0 && mode != "watcher" && mode != "dra-old" {
		return nil, fmt.Errorf("-authority applies to the watcher and dra-old dials only")
	}
	switch mode {
	case "watcher":
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		opts := append([]grpc.DialOption{grpc.WithInsecure(), grpc.WithBlock(), grpc.WithContextDialer(unixDialer)}, override...)
		return grpc.DialContext(ctx, socket, opts...)
	case "dra-old":
		opts := append([]grpc.DialOption{grpc.WithInsecure(), grpc.WithContextDialer(unixDialer)}, override...)
		conn, err := grpc.Dial(socket, opts...)
		if err != nil {
			return nil, err
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if !conn.WaitForStateChange(ctx, connectivity.Connecting) {
			conn.Close()
			return nil, fmt.Errorf("timed out waiting for the gRPC connection to be ready")
		}
		return conn, nil
	case "dra-new":
		return grpc.Dial("unix:"+socket, grpc.WithInsecure())
	case "csi":
		return grpc.Dial(socket, grpc.WithAuthority("localhost"), grpc.WithInsecure(), grpc.WithContextDialer(unixDialer))
	}
	return nil, fmt.Errorf("unknown -dial %q", mode)
}

func invoke(conn *grpc.ClientConn, c call) answer {
	timeout := time.Duration(c.TimeoutMs) * time.Millisecond
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	req, err := base64.StdEncoding.DecodeString(c.Request)
	if err != nil {
		return answer{Code: 3, Message: "kubelet-dial: request is not base64: " + err.Error()}
	}
	codec := grpc.ForceCodec(rawCodec{})
	var out []string
	if c.Stream > 0 {
		desc := &grpc.StreamDesc{ServerStreams: true}
		stream, err := conn.NewStream(ctx, desc, c.Method, codec)
		if err == nil {
			err = stream.SendMsg(&req)
		}
		if err == nil {
			err = stream.CloseSend()
		}
		for err == nil && len(out) < c.Stream {
			var resp []byte
			if err = stream.RecvMsg(&resp); err == nil {
				out = append(out, base64.StdEncoding.EncodeToString(resp))
			}
		}
		if err != nil {
			s := status.Convert(err)
			return answer{Code: uint32(s.Code()), Message: s.Message(), Responses: out}
		}
		return answer{Responses: out}
	}
	var resp []byte
	if err := conn.Invoke(ctx, c.Method, &req, &resp, codec); err != nil {
		s := status.Convert(err)
		return answer{Code: uint32(s.Code()), Message: s.Message()}
	}
	return answer{Responses: []string{base64.StdEncoding.EncodeToString(resp)}}
}

func main() {
	socket := flag.String("socket", "", "the plugin's Unix socket")
	mode := flag.String("dial", "watcher", "watcher | dra-old | dra-new | csi")
	authority := flag.String("authority", "default", "default | percent | =VALUE")
	flag.Parse()
	if *socket == "" {
		fmt.Fprintln(os.Stderr, "kubelet-dial: -socket is required")
		os.Exit(2)
	}
	conn, err := dial(*socket, *mode, *authority)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubelet-dial:", err)
		os.Exit(1)
	}
	defer conn.Close()
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 16<<20)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		if strings.TrimSpace(in.Text()) == "" {
			continue
		}
		var c call
		if err := json.Unmarshal(in.Bytes(), &c); err != nil {
			fmt.Fprintln(os.Stderr, "kubelet-dial: bad call line:", err)
			os.Exit(2)
		}
		if err := out.Encode(invoke(conn, c)); err != nil {
			os.Exit(1)
		}
	}
}
