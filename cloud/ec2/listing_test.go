package ec2

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	ec2types "github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/smithy-go"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/ec2/ec2test"
)

// TestListDecodesAsTheSDK: List's lean decoding gives, instance for
// instance, what the SDK's own decoder gives for the same answers, with tag
// values XML must escape, states other than running, and several pages.
func TestListDecodesAsTheSDK(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	p := newProvider(t, srv, nil)
	ctx := testCtx(t)
	values := []string{
		`a&b<c>d"e'f`, `]]>`, `<![CDATA[x]]>`, "ünïcödé ✓ 日本", "tab\there", "line\r\nbreak\rand\n",
		"", "  spaced  ", "&amp;", strings.Repeat("v", 256),
	}
	var ids []string
	for i, v := range values {
		s := launchSpec(fmt.Sprintf("sdk-%d", i))
		s.Tags["value"] = v
		if len(v) < 100 {
			s.Tags[v+"-as-key"] = "k"
		}
		got, err := p.Launch(ctx, s, 1)
		if err != nil {
			t.Fatalf("launching with tag value %q: %v", v, err)
		}
		ids = append(ids, got[0].ID)
	}
	if _, err := p.Stop(ctx, ids[:2]); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Terminate(ctx, ids[2:3]); err != nil {
		t.Fatal(err)
	}
	filter := map[string]string{cloud.TagPool: "p"}
	for _, size := range []int32{pageSize, 5} {
		t.Run(fmt.Sprintf("pages of %d", size), func(t *testing.T) {
			lean := listPaged(ctx, t, p, filter, size, true)
			sdk := listPaged(ctx, t, p, filter, size, false)
			if len(lean) != len(values) {
				t.Fatalf("lean listing: %d instances, want %d", len(lean), len(values))
			}
			if !reflect.DeepEqual(lean, sdk) {
				for i := range min(len(lean), len(sdk)) {
					if !reflect.DeepEqual(lean[i], sdk[i]) {
						t.Errorf("instance %d:\nlean %#v\nsdk  %#v", i, lean[i], sdk[i])
					}
				}
				t.Fatalf("lean and sdk listings differ (%d and %d instances)", len(lean), len(sdk))
			}
			states := map[cloud.State]int{}
			for _, in := range lean {
				states[in.State]++
				if v := in.Tags["value"]; !slices.Contains(values, v) || len(v) < 100 && in.Tags[v+"-as-key"] != "k" {
					t.Errorf("%s: tags %q are not one of those launched", in.ID, in.Tags)
				}
			}
			if states[cloud.StateRunning] != len(values)-3 || states[cloud.StateStopped]+states[cloud.StateStopping] != 2 {
				t.Errorf("states %v, want %d running, 2 stopped or stopping and 1 ending", states, len(values)-3)
			}
		})
	}
	// And List itself, which pages by the lean decoder.
	listed, err := p.List(ctx, filter)
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(listed, func(a, b cloud.Instance) int { return strings.Compare(a.ID, b.ID) })
	if sdk := listPaged(ctx, t, p, filter, pageSize, false); !reflect.DeepEqual(listed, sdk) {
		t.Errorf("List differs from the SDK's decoding:\n%v\n%v", listed, sdk)
	}
}

// listPaged lists the instances tagged so in pages of size, decoded lean
// or by the SDK, sorted by id.
func listPaged(ctx context.Context, t *testing.T, p *Provider, tags map[string]string, size int32, lean bool) []cloud.Instance {
	t.Helper()
	in := &ec2.DescribeInstancesInput{MaxResults: aws.Int32(size)}
	for k, v := range tags {
		in.Filters = append(in.Filters, ec2types.Filter{Name: aws.String("tag:" + k), Values: []string{v}})
	}
	var out []cloud.Instance
	for pages := 0; ; pages++ {
		if pages > 100 {
			t.Fatal("more than 100 pages")
		}
		var page leanPage
		var opts []func(*ec2.Options)
		if lean {
			opts = append(opts, page.option)
		}
		resp, err := p.api.DescribeInstances(ctx, in, opts...)
		if err != nil {
			t.Fatal(err)
		}
		if !lean {
			for _, r := range resp.Reservations {
				for _, i := range r.Instances {
					page.instances = append(page.instances, toInstance(i))
				}
			}
			page.nextToken = aws.ToString(resp.NextToken)
		}
		out = append(out, page.instances...)
		if page.nextToken == "" {
			break
		}
		in.NextToken = aws.String(page.nextToken)
	}
	slices.SortFunc(out, func(a, b cloud.Instance) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// TestListAnswersThatAreNotAListing: an error answer still reaches the
// pool as EC2's error code (the SDK decodes it), and a successful answer
// that is not a listing (empty, truncated, garbled) is an error, never an
// empty listing that would make every instance look gone.
func TestListAnswersThatAreNotAListing(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	faults := newFaultyTransport()
	faults.reject["Action=DescribeInstances"] = "UnauthorizedOperation"
	p := newProvider(t, srv, func(o *Options) { o.HTTPClient = &http.Client{Transport: faults} })
	garbled := map[string]*Provider{}
	bodies := map[string]string{
		"empty":     "",
		"truncated": `<DescribeInstancesResponse><reservationSet><item><instancesSet><item><instanceId>i-1</instanceId>`,
		"not xml":   "<html>502 Bad Gateway",
		"html":      "<html><body>Service Unavailable</body></html>extra",
		"bad time":  `<R><reservationSet><item><instancesSet><item><launchTime>yesterday</launchTime></item></instancesSet></item></reservationSet></R>`,
	}
	for name, body := range bodies {
		garbled[name] = newProvider(t, srv, func(o *Options) {
			o.HTTPClient = &http.Client{Transport: &fixedAnswer{body: []byte(body)}}
		})
	}
	ctx := testCtx(t)
	_, err := p.List(ctx, nil)
	if code := errorCode(err); code != "UnauthorizedOperation" {
		t.Errorf("List on a refused DescribeInstances: %v (code %q), want EC2's UnauthorizedOperation", err, code)
	}
	snapshots := map[string]*smithy.DeserializationError{}
	for name, p := range garbled {
		got, err := p.List(ctx, nil)
		var derr *smithy.DeserializationError
		if !errors.As(err, &derr) {
			t.Errorf("List on a %s answer: %d instances, %v; want a decoding error", name, len(got), err)
			continue
		}
		snapshots[name] = derr
	}
	// Each error keeps its own copy of the answer's start, though the
	// buffers answers are read into are reused.
	for name, derr := range snapshots {
		if string(derr.Snapshot) != bodies[name] {
			t.Errorf("the %s answer's error shows %q, want %q", name, derr.Snapshot, bodies[name])
		}
	}
}

// fixedAnswer is an HTTP transport that answers every request with body.
type fixedAnswer struct {
	mu   sync.Mutex
	body []byte
}

func (f *fixedAnswer) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Body != nil {
		_, _ = io.Copy(io.Discard, r.Body)
		_ = r.Body.Close()
	}
	f.mu.Lock()
	body := f.body
	f.mu.Unlock()
	return &http.Response{
		StatusCode: http.StatusOK, Status: "200 OK", Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: http.Header{"Content-Type": {"text/xml"}}, Body: io.NopCloser(strings.NewReader(string(body))),
		ContentLength: int64(len(body)), Request: r,
	}, nil
}

const (
	docHead = `<?xml version="1.0" encoding="UTF-8"?>` + "\n" + `<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">`
	docTail = `</DescribeInstancesResponse>`
)

// instanceDoc wraps instance items in a DescribeInstances answer.
func instanceDoc(items ...string) string {
	return docHead + `<requestId>r-1</requestId><reservationSet><item><reservationId>r-0a</reservationId><instancesSet>` +
		strings.Join(items, "") + `</instancesSet></item></reservationSet>` + docTail
}

func TestScanInstances(t *testing.T) {
	launched := time.Date(2026, 12, 3, 6, 0, 0, 0, time.UTC)
	full := `<item><instanceId>i-1</instanceId><imageId>ami-1</imageId><instanceState><code>16</code><name>running</name></instanceState>` +
		`<privateDnsName>ip-10-0-0-1</privateDnsName><instanceType>t3.micro</instanceType><launchTime>2026-12-03T06:00:00.000Z</launchTime>` +
		`<placement><availabilityZone>us-east-1a</availabilityZone><tenancy>default</tenancy></placement>` +
		`<privateIpAddress>10.0.0.1</privateIpAddress><ipAddress>203.0.113.1</ipAddress>` +
		`<networkInterfaceSet><item><privateIpAddress>10.9.9.9</privateIpAddress><association><publicIp>198.51.100.9</publicIp></association></item></networkInterfaceSet>` +
		`<tagSet><item><key>hangar:pool</key><value>demo</value></item><item><key>Name</key><value>a &amp; b</value></item></tagSet></item>`
	fullWant := cloud.Instance{ID: "i-1", Image: "ami-1", State: cloud.StateRunning, Type: "t3.micro", LaunchedAt: launched,
		Zone: "us-east-1a", PrivateIP: "10.0.0.1", PublicIP: "203.0.113.1", Tags: map[string]string{"hangar:pool": "demo", "Name": "a & b"}}
	tagged := func(v string) string {
		return `<item><instanceId>i-2</instanceId><tagSet><item><key>k</key><value>` + v + `</value></item></tagSet></item>`
	}
	taggedWant := func(v string) []cloud.Instance {
		return []cloud.Instance{{ID: "i-2", State: cloud.StateUnknown, Tags: map[string]string{"k": v}}}
	}
	for _, tc := range []struct {
		name, doc string
		want      []cloud.Instance
		next      string
		err       string
	}{
		{name: "full", doc: instanceDoc(full), want: []cloud.Instance{fullWant}},
		{name: "none", doc: docHead + `<reservationSet/>` + docTail},
		{name: "empty sets", doc: docHead + `<reservationSet></reservationSet><reservationSet><item><instancesSet></instancesSet></item><item/></reservationSet>` + docTail},
		{name: "empty instance", doc: instanceDoc(`<item></item><item><instanceState></instanceState><placement/><tagSet></tagSet></item>`),
			want: []cloud.Instance{{}, {}}},
		{name: "self-closing root", doc: `<DescribeInstancesResponse/>`},
		{name: "next token", doc: docHead + `<reservationSet/><nextToken>tok+/=</nextToken>` + docTail, next: "tok+/="},
		{name: "two reservations", doc: docHead + `<reservationSet><item><instancesSet><item><instanceId>i-a</instanceId></item></instancesSet></item>` +
			`<item><instancesSet><item><instanceId>i-b</instanceId></item><item><instanceId>i-c</instanceId></item></instancesSet></item></reservationSet>` + docTail,
			want: []cloud.Instance{{ID: "i-a"}, {ID: "i-b"}, {ID: "i-c"}}},
		{name: "references", doc: instanceDoc(tagged(`&lt;&gt;&amp;&quot;&apos;&#65;&#x42;&#x1F600;`)), want: taggedWant(`<>&"'AB😀`)},
		{name: "cdata", doc: instanceDoc(tagged(`<![CDATA[<raw> & ]]]]><![CDATA[>]]>`)), want: taggedWant(`<raw> & ]]>`)},
		{name: "comment", doc: instanceDoc(tagged(`a<!-- </value> -->b`)), want: taggedWant("ab")},
		{name: "carriage returns", doc: instanceDoc(tagged("a\r\nb\rc<![CDATA[\r\n]]>")), want: taggedWant("a\nb\nc\n")},
		{name: "empty value", doc: instanceDoc(`<item><instanceId>i-2</instanceId><tagSet><item><key>k</key><value/></item><item><key>j</key></item></tagSet></item>`),
			want: []cloud.Instance{{ID: "i-2", State: cloud.StateUnknown, Tags: map[string]string{"k": "", "j": ""}}}},
		{name: "prefixes and case", doc: `<ec2:DescribeInstancesResponse xmlns:ec2="urn:x"><ec2:RESERVATIONSET><ec2:item><InstancesSet><Item>` +
			`<ec2:instanceid>i-3</ec2:instanceid ><INSTANCESTATE><Name>stopped</Name></INSTANCESTATE></Item></InstancesSet></ec2:item></ec2:RESERVATIONSET></ec2:DescribeInstancesResponse>`,
			want: []cloud.Instance{{ID: "i-3", State: cloud.StateStopped}}},
		{name: "kelvin folds to k", doc: instanceDoc(`<item><instanceId>i-4</instanceId><tagSet><item><` + "\u212a" + `ey>x</` + "\u212a" + `ey><value>y</value></item></tagSet></item>`),
			want: []cloud.Instance{{ID: "i-4", State: cloud.StateUnknown, Tags: map[string]string{"x": "y"}}}},
		{name: "attributes", doc: instanceDoc(`<item a="x>y" b='<"'><instanceId c="/>">i-5</instanceId></item>`), want: []cloud.Instance{{ID: "i-5"}}},
		{name: "unknown state", doc: instanceDoc(`<item><instanceId>i-6</instanceId><instanceState><name>rebooting</name></instanceState></item>`),
			want: []cloud.Instance{{ID: "i-6"}}},
		{name: "fields elsewhere are not the instance's", doc: instanceDoc(`<item><instanceId>i-7</instanceId><x><ipAddress>1.2.3.4</ipAddress></x></item>`) +
			"\n", want: []cloud.Instance{{ID: "i-7"}}},

		{name: "mismatched tag", doc: instanceDoc(`<item><instanceId>i-1</instanceid></item>`), err: "closes <instanceId>"},
		{name: "truncated", doc: instanceDoc(full)[:300], err: "ends inside"},
		{name: "unterminated tag", doc: `<DescribeInstancesResponse><reservationSet`, err: "unterminated tag"},
		{name: "doctype", doc: `<!DOCTYPE x [<!ENTITY e "i-9">]>` + instanceDoc(), err: "declaration"},
		{name: "unknown entity", doc: instanceDoc(tagged("&nbsp;")), err: "reference"},
		{name: "invalid character reference", doc: instanceDoc(tagged("&#0;")), err: "reference"},
		{name: "bare ampersand", doc: instanceDoc(tagged("a & b")), err: "reference"},
		{name: "text after the root", doc: instanceDoc() + "x", err: "after the root"},
		{name: "second root", doc: instanceDoc() + `<x/>`, err: "second root"},
		{name: "stray end tag", doc: instanceDoc() + `</x>`, err: "outside any element"},
		{name: "no root", doc: `<?xml version="1.0"?>`, err: "no root"},
		{name: "bad launch time", doc: instanceDoc(`<item><instanceId>i-8</instanceId><launchTime>soon</launchTime></item>`), err: "launch time"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, next, err := scanInstances([]byte(tc.doc))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one about %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) || next != tc.next {
				t.Errorf("got %#v, next %q\nwant %#v, next %q", got, next, tc.want, tc.next)
			}
		})
	}
}

// FuzzScanInstances: on any answer both decoders take, the lean one gives
// what the SDK's gives. (The lean one refuses some answers the SDK takes,
// an empty or truncated body for one: an error there is what keeps a
// garbled listing from reading as "every instance is gone".)
func FuzzScanInstances(f *testing.F) {
	for _, doc := range []string{
		instanceDoc(`<item><instanceId>i-1</instanceId><instanceState><name>running</name></instanceState><tagSet><item><key>a</key><value>b&amp;c</value></item></tagSet></item>`),
		instanceDoc(`<item><instanceId>i-2</instanceId><launchTime>2026-12-03T06:00:00Z</launchTime><placement><availabilityZone>z</availabilityZone></placement></item>`),
		docHead + `<reservationSet/><nextToken>n</nextToken>` + docTail,
		instanceDoc(`<item><ipAddress>1.2.3.4</ipAddress><privateIpAddress><![CDATA[10.0.0.1]]></privateIpAddress><instanceType>t3.micro</instanceType><imageId/></item>`),
	} {
		f.Add([]byte(doc))
	}
	hermetic(f)
	transport := &fixedAnswer{}
	p := newProvider(f, newServer(f, ec2test.Options{}), func(o *Options) {
		o.HTTPClient = &http.Client{Transport: transport}
		o.Logger = slog.New(slog.DiscardHandler)
		// No waiting on the client-side rate limit: nothing is sent
		// anywhere.
		limits := DefaultRateLimits()
		limits.NonMutating = Bucket{}
		o.RateLimits = &limits
		// The SDK retries some answers it cannot read (a truncated one);
		// the fuzzer need not wait a minute for each.
		o.backoff = func(int) time.Duration { return 0 }
	})
	f.Fuzz(func(t *testing.T, doc []byte) {
		lean, leanNext, leanErr := scanInstances(doc)
		transport.mu.Lock()
		transport.body = doc
		transport.mu.Unlock()
		resp, sdkErr := p.api.DescribeInstances(context.Background(), &ec2.DescribeInstancesInput{})
		if leanErr != nil || sdkErr != nil {
			return
		}
		var sdk []cloud.Instance
		for _, r := range resp.Reservations {
			for _, in := range r.Instances {
				sdk = append(sdk, toInstance(in))
			}
		}
		if !reflect.DeepEqual(lean, sdk) || leanNext != aws.ToString(resp.NextToken) {
			t.Errorf("on %q\nlean %#v next %q\nsdk  %#v next %q", doc, lean, leanNext, sdk, aws.ToString(resp.NextToken))
		}
	})
}

// Run with: go test -run '^$' -bench ListDecode -benchtime 20x -count 5 ./cloud/ec2
//
// BenchmarkListDecode: one DescribeInstances page of 1,000 instances (as
// ec2test answers for instances launched with the pool's tags) decoded by
// the SDK's decoder and by List's lean one (an op is one of each), through the same
// SDK client on a transport that answers from memory. Reports each one's
// time per page, the ratio lean/sdk, and the page's size.
func BenchmarkListDecode(b *testing.B) {
	hermetic(b)
	srv := newServer(b, ec2test.Options{Logger: slog.New(slog.DiscardHandler)})
	on := func(t http.RoundTripper) func(*Options) {
		return func(o *Options) {
			o.HTTPClient = &http.Client{Transport: t}
			o.Logger = slog.New(slog.DiscardHandler)
			limits := DefaultRateLimits()
			limits.NonMutating, limits.RunInstances, limits.LaunchedInstances = Bucket{}, Bucket{}, Bucket{}
			o.RateLimits = &limits
		}
	}
	rec := &recording{next: http.DefaultTransport}
	live := newProvider(b, srv, on(rec))
	page := &fixedAnswer{}
	p := newProvider(b, srv, on(page))
	ctx := context.Background()
	spec := launchSpec("bench")
	spec.Tags[cloud.TagOwner] = "hangar-0123456789abcdef"
	if _, err := live.Launch(ctx, spec, pageSize); err != nil {
		b.Fatal(err)
	}
	if _, err := live.List(ctx, map[string]string{cloud.TagPool: "p"}); err != nil {
		b.Fatal(err)
	}
	body := rec.last()
	page.body = body
	in := &ec2.DescribeInstancesInput{MaxResults: aws.Int32(pageSize)}
	// One decoder's garbage is not left for the other's collections: each
	// runs its N pages after a GC.
	runtime.GC()
	b.ResetTimer()
	t0 := time.Now()
	for range b.N {
		resp, err := p.api.DescribeInstances(ctx, in)
		if err != nil {
			b.Fatal(err)
		}
		n := 0
		for _, r := range resp.Reservations {
			for _, i := range r.Instances {
				_ = toInstance(i)
				n++
			}
		}
		if n != pageSize {
			b.Fatalf("the sdk decoded %d instances, want %d", n, pageSize)
		}
	}
	sdkT := time.Since(t0)
	b.StopTimer()
	runtime.GC()
	b.StartTimer()
	t1 := time.Now()
	for range b.N {
		var page leanPage
		if _, err := p.api.DescribeInstances(ctx, in, page.option); err != nil {
			b.Fatal(err)
		}
		if len(page.instances) != pageSize {
			b.Fatalf("lean: %d instances, want %d", len(page.instances), pageSize)
		}
	}
	leanT := time.Since(t1)
	b.ReportMetric(sdkT.Seconds()*1e3/float64(b.N), "sdk-ms/page")
	b.ReportMetric(leanT.Seconds()*1e3/float64(b.N), "lean-ms/page")
	b.ReportMetric(leanT.Seconds()/sdkT.Seconds(), "lean/sdk")
	b.ReportMetric(float64(len(body))/1e6, "page-MB")
}

// recording is an HTTP transport that keeps the last answer's body.
type recording struct {
	next http.RoundTripper
	mu   sync.Mutex
	body []byte
}

func (r *recording) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := r.next.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	body, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.body = body
	r.mu.Unlock()
	resp.Body = io.NopCloser(strings.NewReader(string(body)))
	return resp, nil
}

func (r *recording) last() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.body
}
