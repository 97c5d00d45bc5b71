package ec2

// Finding earlier launches by tag, then by client token, on clouds that
// serve only some filters or are down: through the real SDK against
// ec2test.

import (
	"errors"
	"net/http"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/ec2/ec2test"
	"github.com/hangar-ci/hangar/internal/clock"
)

const refusedLog = "does not serve a DescribeInstances filter"

// TestRefusedFilterHTML500Fast: a cloud that answers the client-token
// filter with an HTML 500 is found out in at most four DescribeInstances
// (not the SDK's full retry budget), once: later launches do not ask it
// again, the fallback is logged once, and Notes shows it.
func TestRefusedFilterHTML500Fast(t *testing.T) {
	hermetic(t)
	for _, tc := range []struct {
		name   string
		tagged bool // the spec carries hangar:intent, so the tag lookup runs first
	}{
		{"tag first", true},
		{"client token only, with a control call", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newServer(t, ec2test.Options{})
			srv.RefuseFilter("client-token", ec2test.HTML500)
			var logs logLines
			ft := newFaultyTransport()
			p := newProvider(t, srv, func(o *Options) {
				o.Logger = logs.logger()
				o.HTTPClient = &http.Client{Transport: ft}
			})
			ctx := testCtx(t)
			spec := func(token string) cloud.LaunchSpec {
				s := launchSpec(token, "t3.small", "t3a.small")
				if !tc.tagged {
					delete(s.Tags, cloud.TagIntent)
				}
				return s
			}
			if _, err := p.Launch(ctx, spec("html-1"), 1); err != nil {
				t.Fatal(err)
			}
			// The tag lookup, the probe, the control without the
			// filter, the probe again.
			if n := ft.count("DescribeInstances"); n > 4 {
				t.Errorf("%d DescribeInstances to find the filter refused, want at most 4", n)
			}
			if n := srv.Errors()["DescribeInstances/HTML500"]; n != 2 {
				t.Errorf("%d HTML 500 answers, want 2 (a probe and one more single attempt)", n)
			}
			for _, token := range []string{"html-2", "html-3"} {
				if _, err := p.Launch(ctx, spec(token), 1); err != nil {
					t.Fatal(err)
				}
			}
			if n := ft.sent("DescribeInstances", "client-token"); n != 2 {
				t.Errorf("client-token asked %d times over three launches, want 2 (the probe only)", n)
			}
			if n := logs.count(refusedLog); n != 1 {
				t.Errorf("the refusal was logged %d times, want once:\n%s", n, logs.buf.String())
			}
			want := "filter client-token refused by the cloud (HTTP 500, not XML); finding earlier launches by tag only"
			if notes := p.Notes(); !slices.Equal(notes, []string{want}) {
				t.Errorf("Notes() = %q, want [%q]", notes, want)
			}
			if srv.Running() != 3 {
				t.Errorf("%d running, want 3", srv.Running())
			}
		})
	}
}

// TestRefusedFilter400: a 4xx code refuses a filter in one request.
func TestRefusedFilter400(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	srv.RefuseFilter("tag:", ec2test.Refuse400)
	p := newProvider(t, srv, nil)
	ctx := testCtx(t)
	if _, err := p.Launch(ctx, launchSpec("r400", "t3.small", "t3a.small"), 1); err != nil {
		t.Fatal(err)
	}
	if n := srv.Errors()["DescribeInstances/InvalidParameterValue"]; n != 1 {
		t.Errorf("%d refusals, want 1", n)
	}
	if n := srv.Calls()["DescribeInstances"]; n != 2 {
		t.Errorf("%d DescribeInstances, want 2 (the refused tag lookup, then by client token)", n)
	}
	want := "filter tag:hangar:intent refused by the cloud (HTTP 400 InvalidParameterValue); finding earlier launches by client token only"
	if notes := p.Notes(); !slices.Equal(notes, []string{want}) {
		t.Errorf("Notes() = %q, want [%q]", notes, want)
	}
}

// TestFilterProbeDuringOutage: a cloud that answers every DescribeInstances
// with an HTML 5xx is down, not refusing a filter: the launch fails with an
// uncertain error (so the pool backs off and asks again), launches nothing
// blind, and nothing is marked refused; once the cloud is back, the next
// launch probes again and works.
// A proxy's 502s while a filter is first asked are a passing fault, not
// a refusal: the probe asks again and the filter is served.
func TestFilterProbeThrough502s(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	ft := newFaultyTransport()
	blips := 0
	ft.down = func(action string) bool {
		if action == "DescribeInstances" && blips < 2 {
			blips++
			return true
		}
		return false
	}
	var logs logLines
	p := newProvider(t, srv, func(o *Options) {
		o.HTTPClient = &http.Client{Transport: ft}
		o.backoff = func(int) time.Duration { return time.Millisecond }
		o.Logger = logs.logger()
	})
	if _, err := p.Launch(testCtx(t), launchSpec("blip", "t3.small", "t3a.small"), 1); err != nil {
		t.Fatalf("Launch through two 502s: %v", err)
	}
	if notes := p.Notes(); len(notes) != 0 {
		t.Errorf("Notes() = %q after two 502s, want none", notes)
	}
	if n := logs.count(refusedLog); n != 0 {
		t.Errorf("502s were logged as a refused filter %d times", n)
	}
}

func TestFilterProbeDuringOutage(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	ft := newFaultyTransport()
	ft.down = func(action string) bool { return action == "DescribeInstances" }
	var logs logLines
	p := newProvider(t, srv, func(o *Options) {
		o.HTTPClient = &http.Client{Transport: ft}
		o.backoff = func(int) time.Duration { return time.Millisecond }
		o.Logger = logs.logger()
	})
	ctx := testCtx(t)
	for _, tagged := range []bool{true, false} {
		spec := launchSpec("outage", "t3.small", "t3a.small")
		if !tagged {
			delete(spec.Tags, cloud.TagIntent)
		}
		_, err := p.Launch(ctx, spec, 1)
		if err == nil || !uncertain(err) || errors.Is(err, cloud.ErrCapacity) {
			t.Fatalf("Launch (tagged %v) while the cloud is down: %v, want an uncertain error", tagged, err)
		}
	}
	if n := ft.count("RunInstances"); n != 0 {
		t.Errorf("%d RunInstances while no lookup was possible, want 0", n)
	}
	if notes := p.Notes(); len(notes) != 0 {
		t.Errorf("Notes() = %q during an outage, want none", notes)
	}
	if n := logs.count(refusedLog); n != 0 {
		t.Errorf("an outage was logged as a refused filter %d times", n)
	}

	ft.mu.Lock()
	ft.down = nil
	ft.mu.Unlock()
	insts, err := p.Launch(ctx, launchSpec("outage", "t3.small", "t3a.small"), 1)
	if err != nil || len(insts) != 1 {
		t.Fatalf("Launch after the outage: %v, %v", insts, err)
	}
	if notes := p.Notes(); len(notes) != 0 {
		t.Errorf("Notes() = %q after the outage, want none", notes)
	}
}

// TestFilterProbeEC2Fault: a 500 with EC2's InternalError is EC2 failing,
// not refusing the filter: a few single attempts, then an uncertain error,
// and nothing marked refused.
func TestFilterProbeEC2Fault(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	ft := newFaultyTransport()
	ft.reject["client-token"] = "InternalError"
	ft.rejectStatus = http.StatusInternalServerError
	p := newProvider(t, srv, func(o *Options) {
		o.HTTPClient = &http.Client{Transport: ft}
		o.backoff = func(int) time.Duration { return time.Millisecond }
	})
	spec := launchSpec("ec2-fault", "t3.small", "t3a.small")
	delete(spec.Tags, cloud.TagIntent)
	_, err := p.Launch(testCtx(t), spec, 1)
	if err == nil || !uncertain(err) {
		t.Fatalf("Launch: %v, want an uncertain error", err)
	}
	if n := ft.sent("DescribeInstances", "client-token"); n != probeAttempts {
		t.Errorf("client-token asked %d times, want %d single attempts", n, probeAttempts)
	}
	if n := ft.count("RunInstances"); n != 0 {
		t.Errorf("%d RunInstances, want 0", n)
	}
	if notes := p.Notes(); len(notes) != 0 {
		t.Errorf("Notes() = %q, want none: InternalError refuses nothing", notes)
	}
}

// TestLookupByIntentTagFirst: a launch landed on its second offering and
// its caller never heard. A fresh provider, with the first offering free
// again, finds it by tag, asks no client-token lookup, and answers with
// the same instances by replaying that offering's launch; nothing new
// starts. With tag filters refused, the client token finds it instead.
func TestLookupByIntentTagFirst(t *testing.T) {
	hermetic(t)
	for _, refuseTags := range []bool{false, true} {
		srv := newServer(t, ec2test.Options{})
		ctx := testCtx(t)
		spec := launchSpec("by-tag", "t3.small", "t3a.small")
		var full atomic.Bool
		full.Store(true)
		srv.SetCapacity(func(typ, zone, market string) string {
			if full.Load() && typ == "t3.small" {
				return "InsufficientInstanceCapacity"
			}
			return ""
		})
		first, err := newProvider(t, srv, nil).Launch(ctx, spec, 2)
		if err != nil {
			t.Fatal(err)
		}
		full.Store(false)
		if refuseTags {
			srv.RefuseFilter("tag:", ec2test.Refuse400)
		}
		ft := newFaultyTransport()
		p := newProvider(t, srv, func(o *Options) { o.HTTPClient = &http.Client{Transport: ft} })
		again, err := p.Launch(ctx, spec, 2)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(instanceIDs(again), instanceIDs(first)) {
			t.Errorf("refused tags %v: relaunch returned %v, want %v", refuseTags, instanceIDs(again), instanceIDs(first))
		}
		if n := srv.Running(); n != 2 {
			t.Errorf("refused tags %v: %d running, want 2", refuseTags, n)
		}
		if n := srv.Launches(clientToken("by-tag", offering{Type: "t3.small"})); n != 0 {
			t.Errorf("refused tags %v: the first offering launched %d times", refuseTags, n)
		}
		tokenLookups := ft.sent("DescribeInstances", "client-token")
		if !refuseTags && tokenLookups != 0 {
			t.Errorf("%d client-token lookups although the tag found the launch, want 0", tokenLookups)
		}
		if refuseTags && tokenLookups != 1 {
			t.Errorf("%d client-token lookups with tag filters refused, want 1", tokenLookups)
		}
		if !refuseTags && ft.sent("RunInstances", "") != 1 {
			t.Errorf("%d RunInstances, want 1 (the replay)", ft.sent("RunInstances", ""))
		}
	}
}

// TestRefusedFilterRechecked: a refusal is trusted for an hour, then the
// filter is asked again, and a cloud that now serves it loses its note.
func TestRefusedFilterRechecked(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	srv.RefuseFilter("client-token", ec2test.HTML500)
	clk := &offsetClock{}
	p := newProvider(t, srv, func(o *Options) { o.Clock = clk })
	ctx := testCtx(t)
	if _, err := p.Launch(ctx, launchSpec("recheck-1", "t3.small", "t3a.small"), 1); err != nil {
		t.Fatal(err)
	}
	if len(p.Notes()) != 1 {
		t.Fatalf("Notes() = %q, want the refusal", p.Notes())
	}
	srv.RefuseFilter("client-token", ec2test.Serve)
	clk.add(refusedRecheck - time.Minute)
	if _, err := p.Launch(ctx, launchSpec("recheck-2", "t3.small", "t3a.small"), 1); err != nil {
		t.Fatal(err)
	}
	if len(p.Notes()) != 1 {
		t.Errorf("Notes() = %q within the hour, want the refusal still", p.Notes())
	}
	clk.add(2 * time.Minute)
	if _, err := p.Launch(ctx, launchSpec("recheck-3", "t3.small", "t3a.small"), 1); err != nil {
		t.Fatal(err)
	}
	if notes := p.Notes(); len(notes) != 0 {
		t.Errorf("Notes() = %q after the filter was served again, want none", notes)
	}
}

// offsetClock is the real clock moved forward by what add adds.
type offsetClock struct{ off atomic.Int64 }

func (c *offsetClock) add(d time.Duration) { c.off.Add(int64(d)) }

func (c *offsetClock) Now() time.Time { return time.Now().Add(time.Duration(c.off.Load())) }

func (c *offsetClock) NewTimer(d time.Duration) clock.Timer { return clock.Real.NewTimer(d) }

func (c *offsetClock) NewTicker(d time.Duration) clock.Ticker { return clock.Real.NewTicker(d) }
