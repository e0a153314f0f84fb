// Command layerline-go-client calls layerline's public API from Go.
//
// It calls Coordinator.Generate or Coordinator.GenerateStream and prints one JSON line:
//
//	{"text": "...", "token_ids": [...], "finish_reason": "FINISH_REASON_LENGTH"}
//
// For -mode stream the text and token ids of all messages are concatenated and
// finish_reason is the one of the last message.
//
// Exit status: 0 on success; on a failed call, the gRPC status code (1-16) with
// {"error": {"code": N, "status": "NAME", "message": "..."}} on stderr; 64 for bad
// command-line arguments. The flags and output are those of the Node client in ../node.
//
// With -api-key, or else LAYERLINE_API_KEY in the environment, every call carries the
// metadata "authorization: Bearer KEY" (for a coordinator started with --api-keys).
//
// The stubs in package layerline/v1 are generated from protos/coordinator.proto by
// build.sh; they are not committed.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	layerlinev1 "layerline/v1"
)

const exitUsage = 64

// bearerToken matches an empty key (none sent) or a bearer token's characters.
var bearerToken = regexp.MustCompile(`^[A-Za-z0-9\-._~+/=]*$`)

type options struct {
	address      string
	prompt       string
	maxNewTokens int
	mode         string
	deadlineMs   int
	apiKey       string
}

type result struct {
	Text         string  `json:"text"`
	TokenIDs     []int32 `json:"token_ids"`
	FinishReason string  `json:"finish_reason"`
}

func parseFlags(args []string) (options, error) {
	var opts options
	fs := flag.NewFlagSet("layerline-go-client", flag.ContinueOnError)
	fs.StringVar(&opts.address, "address", "", "the coordinator, HOST:PORT (plaintext)")
	fs.StringVar(&opts.prompt, "prompt", "", "raw prompt text")
	fs.IntVar(&opts.maxNewTokens, "max-new-tokens", 0, "tokens to generate (0: the server default)")
	fs.StringVar(&opts.mode, "mode", "unary", "unary (Generate) or stream (GenerateStream)")
	fs.IntVar(&opts.deadlineMs, "deadline-ms", 0, "call deadline in milliseconds (0: none)")
	// The environment is read after parsing, so usage messages never print the key as a default.
	fs.StringVar(&opts.apiKey, "api-key", "", "sent as 'authorization: Bearer KEY' (default: $LAYERLINE_API_KEY)")
	if err := fs.Parse(args); err != nil {
		return opts, err
	}
	keyGiven := false
	fs.Visit(func(f *flag.Flag) { keyGiven = keyGiven || f.Name == "api-key" })
	if !keyGiven {
		opts.apiKey = os.Getenv("LAYERLINE_API_KEY")
	}
	opts.apiKey = strings.TrimSpace(opts.apiKey)
	switch {
	case fs.NArg() > 0:
		return opts, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	case opts.address == "":
		return opts, errors.New("-address is required")
	case opts.mode != "unary" && opts.mode != "stream":
		return opts, fmt.Errorf("-mode is unary or stream, got %q", opts.mode)
	case opts.maxNewTokens < 0 || opts.maxNewTokens > 1<<31-1:
		return opts, fmt.Errorf("-max-new-tokens out of range: %d", opts.maxNewTokens)
	case opts.deadlineMs < 0:
		return opts, fmt.Errorf("-deadline-ms must not be negative: %d", opts.deadlineMs)
	case !bearerToken.MatchString(opts.apiKey):
		return opts, errors.New("the API key (-api-key or LAYERLINE_API_KEY) has characters a bearer token cannot have")
	}
	return opts, nil
}

func writeJSON(w io.Writer, value interface{}) {
	encoder := json.NewEncoder(w)
	encoder.SetEscapeHTML(false)
	_ = encoder.Encode(value) // Encode ends the line
}

func generate(ctx context.Context, client layerlinev1.CoordinatorClient, opts options) (result, error) {
	request := &layerlinev1.GenerateRequest{Prompt: opts.prompt, MaxNewTokens: int32(opts.maxNewTokens)}
	out := result{TokenIDs: []int32{}}
	if opts.mode == "unary" {
		response, err := client.Generate(ctx, request)
		if err != nil {
			return out, err
		}
		out.Text = response.GetText()
		out.TokenIDs = append(out.TokenIDs, response.GetTokenIds()...)
		out.FinishReason = response.GetFinishReason().String()
		return out, nil
	}

	stream, err := client.GenerateStream(ctx, request)
	if err != nil {
		return out, err
	}
	var text strings.Builder
	out.FinishReason = layerlinev1.FinishReason_FINISH_REASON_UNSPECIFIED.String()
	for {
		message, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return out, err
		}
		text.WriteString(message.GetText())
		out.TokenIDs = append(out.TokenIDs, message.GetTokenIds()...)
		out.FinishReason = message.GetFinishReason().String()
	}
	out.Text = text.String()
	return out, nil
}

func main() {
	opts, err := parseFlags(os.Args[1:])
	if err == flag.ErrHelp {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "layerline-go-client: %v (see -help)\n", err)
		os.Exit(exitUsage)
	}

	ctx := context.Background()
	if opts.deadlineMs > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(opts.deadlineMs)*time.Millisecond)
		defer cancel()
	}
	if opts.apiKey != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+opts.apiKey)
	}
	// grpc.Dial connects lazily; connection failures surface as UNAVAILABLE on the call.
	// WithInsecure (not credentials/insecure) keeps this building against the grpc-go
	// that Debian packages.
	conn, err := grpc.Dial(opts.address, grpc.WithInsecure())
	if err != nil {
		fmt.Fprintf(os.Stderr, "layerline-go-client: %v\n", err)
		os.Exit(exitUsage)
	}

	out, err := generate(ctx, layerlinev1.NewCoordinatorClient(conn), opts)
	conn.Close()
	if err != nil {
		st := status.Convert(err)
		code := st.Code()
		if code == codes.OK {
			code = codes.Unknown
		}
		writeJSON(os.Stderr, map[string]interface{}{"error": map[string]interface{}{
			"code": int(code), "status": statusName(code), "message": st.Message()}})
		os.Exit(int(code))
	}
	writeJSON(os.Stdout, out)
}

// statusName is the canonical upper-case name of a code, e.g. DEADLINE_EXCEEDED
// (codes.Code.String gives the CamelCase form).
func statusName(code codes.Code) string {
	names := map[codes.Code]string{
		codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN",
		codes.InvalidArgument: "INVALID_ARGUMENT", codes.DeadlineExceeded: "DEADLINE_EXCEEDED",
		codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
		codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
		codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED",
		codes.OutOfRange: "OUT_OF_RANGE", codes.Unimplemented: "UNIMPLEMENTED", codes.Internal: "INTERNAL",
		codes.Unavailable: "UNAVAILABLE", codes.DataLoss: "DATA_LOSS", codes.Unauthenticated: "UNAUTHENTICATED",
	}
	if name, ok := names[code]; ok {
		return name
	}
	return "UNKNOWN"
}
