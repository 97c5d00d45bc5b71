package ec2test

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/xml"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"
)

// These helpers speak to the server over plain HTTP and read its answers
// with a generic XML tree, not with the server's own types, so the tests
// see what a client sees.

func newServer(t *testing.T, opts Options) *Server {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	s := New(opts)
	t.Cleanup(s.Close)
	return s
}

// node is an XML element: its local name, text and children.
type node struct {
	name     string
	text     string
	children []*node
}

func parseXML(t *testing.T, body []byte) *node {
	t.Helper()
	d := xml.NewDecoder(strings.NewReader(string(body)))
	var stack []*node
	var root *node
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("parsing response XML: %v\n%s", err, body)
		}
		switch tok := tok.(type) {
		case xml.StartElement:
			n := &node{name: tok.Name.Local}
			if len(stack) > 0 {
				p := stack[len(stack)-1]
				p.children = append(p.children, n)
			} else {
				root = n
			}
			stack = append(stack, n)
		case xml.EndElement:
			stack = stack[:len(stack)-1]
		case xml.CharData:
			if len(stack) > 0 {
				stack[len(stack)-1].text += string(tok)
			}
		}
	}
	if root == nil {
		t.Fatalf("empty response")
	}
	return root
}

// all returns the nodes at a slash-separated path below n.
func (n *node) all(path string) []*node {
	cur := []*node{n}
	for name := range strings.SplitSeq(path, "/") {
		var next []*node
		for _, c := range cur {
			for _, k := range c.children {
				if k.name == name {
					next = append(next, k)
				}
			}
		}
		cur = next
	}
	return cur
}

// texts returns the text of every node at path.
func (n *node) texts(path string) []string {
	var out []string
	for _, k := range n.all(path) {
		out = append(out, k.text)
	}
	return out
}

// get returns the text at path, "" if absent.
func (n *node) get(path string) string {
	if ks := n.all(path); len(ks) > 0 {
		return ks[0].text
	}
	return ""
}

// reply is a response as the test client saw it.
type reply struct {
	status int
	root   *node
	body   []byte
}

// code is the EC2 error code, "" on success.
func (r reply) code() string {
	if r.root.name != "Response" {
		return ""
	}
	return r.root.get("Errors/Error/Code")
}

func (r reply) message() string { return r.root.get("Errors/Error/Message") }

// instanceIDs lists the instance ids in a Run/DescribeInstances answer.
func (r reply) instanceIDs() []string {
	if ids := r.root.texts("instancesSet/item/instanceId"); len(ids) > 0 {
		return ids
	}
	return r.root.texts("reservationSet/item/instancesSet/item/instanceId")
}

const testAuth = "AWS4-HMAC-SHA256 Credential=AKIDEC2TEST/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host;x-amz-date, Signature=00"

// authFor is testAuth scoped to another region.
func authFor(region string) string {
	return strings.Replace(testAuth, "/us-east-1/", "/"+region+"/", 1)
}

// call posts one action with key, value pairs as the SDK would.
func call(t *testing.T, s *Server, action string, kv ...string) reply {
	t.Helper()
	return callAuth(t, s, testAuth, action, kv...)
}

// callIn is call in another region.
func callIn(t *testing.T, s *Server, region, action string, kv ...string) reply {
	t.Helper()
	return callAuth(t, s, authFor(region), action, kv...)
}

// mustCallIn is mustCall in another region.
func mustCallIn(t *testing.T, s *Server, region, action string, kv ...string) reply {
	t.Helper()
	r := callIn(t, s, region, action, kv...)
	if r.status != http.StatusOK {
		t.Fatalf("%s in %s: HTTP %d %s: %s", action, region, r.status, r.code(), r.message())
	}
	return r
}

// publicKey makes a new Ed25519 key and returns its authorized_keys line.
func publicKey(t *testing.T, comment string) []byte {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	sp, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	line := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sp)))
	if comment != "" {
		line += " " + comment
	}
	return []byte(line + "\n")
}

// importKey imports a new key pair called name through ImportKeyPair.
func importKey(t *testing.T, s *Server, name string) reply {
	t.Helper()
	return mustCall(t, s, "ImportKeyPair", "KeyName", name, "PublicKeyMaterial", b64(string(publicKey(t, name+"@test"))))
}

func callAuth(t *testing.T, s *Server, auth, action string, kv ...string) reply {
	t.Helper()
	form := url.Values{"Action": {action}, "Version": {apiVersion}}
	for i := 0; i+1 < len(kv); i += 2 {
		form.Add(kv[i], kv[i+1])
	}
	req, err := http.NewRequest(http.MethodPost, s.URL(), strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s: %v", action, err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return reply{status: resp.StatusCode, root: parseXML(t, body), body: body}
}

// mustCall is call that fails the test on an error response.
func mustCall(t *testing.T, s *Server, action string, kv ...string) reply {
	t.Helper()
	r := call(t, s, action, kv...)
	if r.status != http.StatusOK {
		t.Fatalf("%s: HTTP %d %s: %s", action, r.status, r.code(), r.message())
	}
	return r
}

// wantError checks an error response's status and code.
func wantError(t *testing.T, r reply, status int, code string) {
	t.Helper()
	if r.status != status || r.code() != code {
		t.Fatalf("got HTTP %d %q (%s), want HTTP %d %q", r.status, r.code(), r.message(), status, code)
	}
}

// run launches count instances from the default image with extra params.
func run(t *testing.T, s *Server, count int, kv ...string) reply {
	t.Helper()
	n := strconv.Itoa(count)
	return mustCall(t, s, "RunInstances", append([]string{"ImageId", DefaultImageID, "MinCount", n, "MaxCount", n}, kv...)...)
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
