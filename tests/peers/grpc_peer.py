#!/usr/bin/env python3
"""A gRPC client we did not write, for hybridlet's peers tier.

Two transports, one interface:

  grpc_peer.py --stubs DIR --socket PATH [--authority FORM]           grpc C-core (grpcio)
  grpc_peer.py --stubs DIR --socket PATH --raw-h2 [--authority FORM]  the h2 library, by hand

--stubs is the directory `setup` generated with grpcio-tools from hybridlet's own .proto
files; requests are parsed and responses decoded with those message classes, so the
protobuf runtime (not hybridlet) judges the bytes.

FORM, the :authority sent:
  default   grpcio: what C-core sends for the target unix:PATH (the path, percent-encoded);
            --raw-h2: the same string
  absent    --raw-h2 only: no :authority header at all
  =VALUE    VALUE verbatim ("=" alone: the empty string)

Calls are JSON lines on stdin, answers JSON lines on stdout (as tests/peers/kubelet-dial):
  {"method": "/pkg.Service/Method", "request": "<base64>", "stream": 0, "timeout_ms": 5000}
  {"code": 0, "message": "", "responses": ["<base64>"], "decoded": [{...}]}
"""

import argparse
import base64
import importlib.util
import json
import pathlib
import socket
import sys
import urllib.parse

from google.protobuf import descriptor_pool, json_format, message_factory


def load_stubs(directory):
    """Import every generated *_pb2.py so their files land in the default pool."""
    for path in sorted(pathlib.Path(directory).rglob("*_pb2.py")):
        name = "hybridlet_stub_" + "_".join(path.relative_to(directory).with_suffix("").parts).replace("-", "_")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


def classes(method):
    """Request and response classes of '/pkg.Service/Method' from the pool."""
    service, name = method.lstrip("/").rsplit("/", 1)
    desc = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    return (
        message_factory.GetMessageClass(desc.input_type),
        message_factory.GetMessageClass(desc.output_type),
    )


def answer(code, message, responses, response_class):
    decoded = [
        json_format.MessageToDict(response_class.FromString(r), preserving_proto_field_name=True)
        for r in responses
    ]
    return {
        "code": code,
        "message": message,
        "responses": [base64.b64encode(r).decode() for r in responses],
        "decoded": decoded,
    }


def grpcio_call(channel, call):
    import grpc

    request_class, response_class = classes(call["method"])
    request = request_class.FromString(base64.b64decode(call.get("request", "")))
    timeout = call.get("timeout_ms", 10000) / 1000
    responses = []
    try:
        if call.get("stream", 0) > 0:
            stub = channel.unary_stream(
                call["method"],
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
            stream = stub(request, timeout=timeout)
            for response in stream:
                responses.append(response.SerializeToString())
                if len(responses) >= call["stream"]:
                    stream.cancel()
                    break
        else:
            stub = channel.unary_unary(
                call["method"],
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
            responses.append(stub(request, timeout=timeout).SerializeToString())
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED or not responses:
            return answer(e.code().value[0], e.details() or "", responses, response_class)
    return answer(0, "", responses, response_class)


def raw_h2_call(path, authority, call):
    """One gRPC call on a fresh connection, headers exactly as given (no validation)."""
    import h2.config
    import h2.connection
    import h2.events

    request_class, response_class = classes(call["method"])
    body = request_class.FromString(base64.b64decode(call.get("request", ""))).SerializeToString()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(call.get("timeout_ms", 10000) / 1000)
    sock.connect(path)
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    headers = [(":method", "POST"), (":scheme", "http"), (":path", call["method"])]
    if authority is not None:
        headers.append((":authority", authority))
    headers += [("content-type", "application/grpc"), ("te", "trailers")]
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, headers)
    conn.send_data(stream_id, b"\x00" + len(body).to_bytes(4, "big") + body, end_stream=True)
    sock.sendall(conn.data_to_send())
    data, trailers, want = b"", {}, call.get("stream", 0) or 1
    done = False
    try:
        while not done:
            chunk = sock.recv(65536)
            if not chunk:
                break
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.TrailersReceived, h2.events.ResponseReceived)):
                    trailers.update({k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v for k, v in event.headers})
                elif isinstance(event, h2.events.StreamReset):
                    sock.close()
                    return answer(13, f"stream reset by the server: {event.error_code!r}", [], response_class)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    sock.close()
                    return answer(14, f"connection closed by the server: {event.error_code!r}", [], response_class)
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
            sock.sendall(conn.data_to_send())
            if call.get("stream", 0) and count_messages(data) >= want:
                break
    except socket.timeout:
        sock.close()
        return answer(4, "no answer before the deadline", [], response_class)
    sock.close()
    responses = split_messages(data)[:want] if call.get("stream", 0) else split_messages(data)
    code = int(trailers.get("grpc-status", "0" if call.get("stream", 0) else "2"))
    message = urllib.parse.unquote(trailers.get("grpc-message", ""))
    return answer(code, message, responses, response_class)


def split_messages(data):
    out = []
    while len(data) >= 5:
        length = int.from_bytes(data[1:5], "big")
        out.append(data[5 : 5 + length])
        data = data[5 + length :]
    return out


def count_messages(data):
    return len(split_messages(data))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stubs", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--authority", default="default")
    parser.add_argument("--raw-h2", action="store_true")
    args = parser.parse_args()
    load_stubs(args.stubs)

    if args.authority == "default":
        authority = urllib.parse.quote(args.socket, safe="")
    elif args.authority == "absent":
        if not args.raw_h2:
            parser.error("--authority absent needs --raw-h2")
        authority = None
    elif args.authority.startswith("="):
        authority = args.authority[1:]
    else:
        parser.error(f"unknown --authority {args.authority!r}")

    channel = None
    if not args.raw_h2:
        import grpc

        options = [] if args.authority == "default" else [("grpc.default_authority", authority)]
        channel = grpc.insecure_channel("unix:" + args.socket, options=options)
    for line in sys.stdin:
        if not line.strip():
            continue
        call = json.loads(line)
        if args.raw_h2:
            result = raw_h2_call(args.socket, authority, call)
        else:
            result = grpcio_call(channel, call)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
