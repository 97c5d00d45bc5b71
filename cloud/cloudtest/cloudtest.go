// Package cloudtest is the conformance suite every cloud.Provider must pass.
// It uses only the cloud.Provider contract, so that the local cloud and EC2
// (against its test server) are held to the same behaviour.
package cloudtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// Options adapts the suite to a provider.
type Options struct {
	// Image and InstanceTypes to launch with. Defaults suit the local cloud.
	Image         string
	InstanceTypes []string
	// Wait bounds how long to wait for state changes and console output
	// (default 30s).
	Wait time.Duration
	// UnknownID is an id in the provider's format that names no instance
	// (default "i-0000000000000000f").
	UnknownID string
}

const runTag = "cloudtest:run" // unique per subtest, so runs never see each other

// Run runs the suite. newProvider returns a fresh provider for each subtest
// and arranges its Close with t.Cleanup. Every instance the suite launches is
// terminated in t.Cleanup.
func Run(t *testing.T, newProvider func(t *testing.T) cloud.Provider, opts Options) {
	if opts.Image == "" {
		opts.Image = "local"
	}
	if opts.Wait <= 0 {
		opts.Wait = 30 * time.Second
	}
	if opts.UnknownID == "" {
		opts.UnknownID = "i-0000000000000000f"
	}
	tests := []struct {
		name string
		run  func(*suite)
	}{
		{"LaunchListConsole", (*suite).launchListConsole},
		{"ClientTokenRequired", (*suite).clientTokenRequired},
		{"ClientTokenIdempotent", (*suite).clientTokenIdempotent},
		{"ListFiltersByTags", (*suite).listFiltersByTags},
		{"TerminateIdempotent", (*suite).terminateIdempotent},
		{"TerminateConcurrent", (*suite).terminateConcurrent},
		{"StopStart", (*suite).stopStart},
		{"ConsoleOutputUnknown", (*suite).consoleOutputUnknown},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 4*opts.Wait)
			t.Cleanup(cancel)
			s := &suite{t: t, ctx: ctx, p: newProvider(t), opts: opts, run: randHex(8)}
			tc.run(s)
		})
	}
}

type suite struct {
	t    *testing.T
	ctx  context.Context
	p    cloud.Provider
	opts Options
	run  string
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// tags returns the subtest's run tag plus extra.
func (s *suite) tags(extra map[string]string) map[string]string {
	tags := map[string]string{runTag: s.run}
	maps.Copy(tags, extra)
	return tags
}

func (s *suite) spec(userData string, extra map[string]string) cloud.LaunchSpec {
	return cloud.LaunchSpec{
		Image:         s.opts.Image,
		InstanceTypes: s.opts.InstanceTypes,
		UserData:      []byte(userData),
		Tags:          s.tags(extra),
		ClientToken:   "cloudtest-" + randHex(12),
	}
}

// launch launches and registers the instances for termination at cleanup.
func (s *suite) launch(spec cloud.LaunchSpec, n int) []cloud.Instance {
	s.t.Helper()
	insts, err := s.p.Launch(s.ctx, spec, n)
	s.cleanupTerminate(ids(insts))
	if err != nil {
		s.t.Fatalf("Launch(n=%d): %v", n, err)
	}
	if len(insts) != n {
		s.t.Fatalf("Launch(n=%d) returned %d instances: %+v", n, len(insts), insts)
	}
	return insts
}

func (s *suite) cleanupTerminate(ids []string) {
	if len(ids) == 0 {
		return
	}
	s.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), s.opts.Wait)
		defer cancel()
		if _, err := s.p.Terminate(ctx, ids); err != nil {
			s.t.Errorf("cleanup: Terminate(%v): %v", ids, err)
		}
	})
}

func ids(insts []cloud.Instance) []string {
	out := make([]string, len(insts))
	for i, in := range insts {
		out[i] = in.ID
	}
	slices.Sort(out)
	return out
}

func (s *suite) list(tags map[string]string) []cloud.Instance {
	s.t.Helper()
	insts, err := s.p.List(s.ctx, tags)
	if err != nil {
		s.t.Fatalf("List(%v): %v", tags, err)
	}
	return insts
}

// waitFor polls List until ok holds for the listed instances.
func (s *suite) waitFor(what string, tags map[string]string, ok func([]cloud.Instance) bool) []cloud.Instance {
	s.t.Helper()
	deadline := time.Now().Add(s.opts.Wait)
	for {
		insts := s.list(tags)
		if ok(insts) {
			return insts
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("waited %s for %s; List(%v) = %s", s.opts.Wait, what, tags, describe(insts))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func describe(insts []cloud.Instance) string {
	var b strings.Builder
	for _, in := range insts {
		fmt.Fprintf(&b, "[%s %s %v] ", in.ID, in.State, in.Tags)
	}
	return b.String()
}

func allIn(want []string, state cloud.State) func([]cloud.Instance) bool {
	return func(insts []cloud.Instance) bool {
		n := 0
		for _, in := range insts {
			if slices.Contains(want, in.ID) && in.State == state {
				n++
			}
		}
		return n == len(want)
	}
}

func (s *suite) launchListConsole() {
	marker := "cloudtest-marker-" + s.run
	// The marker is built at run time so that echoing the script itself
	// (some consoles show user-data) cannot satisfy the check.
	userData := "#!/bin/bash\necho \"cloudtest-marker-$(echo " + s.run + ")\"\n"
	insts := s.launch(s.spec(userData, nil), 2)
	want := ids(insts)
	if want[0] == want[1] || want[0] == "" {
		s.t.Fatalf("Launch returned ids %v, want two distinct ids", want)
	}
	for _, in := range insts {
		if in.State != cloud.StatePending && in.State != cloud.StateRunning {
			s.t.Errorf("Launch returned %s in state %s, want pending or running", in.ID, in.State)
		}
	}
	listed := s.waitFor("both instances running", s.tags(nil), allIn(want, cloud.StateRunning))
	if got := ids(listed); !slices.Equal(got, want) {
		s.t.Errorf("List by run tag = %v, want %v", got, want)
	}
	if !s.p.Capabilities().ConsoleOutput {
		return
	}
	for _, id := range want {
		deadline := time.Now().Add(s.opts.Wait)
		for {
			out, err := s.p.ConsoleOutput(s.ctx, id)
			if err != nil {
				s.t.Fatalf("ConsoleOutput(%s): %v", id, err)
			}
			if strings.Contains(string(out), marker) {
				break
			}
			if time.Now().After(deadline) {
				s.t.Fatalf("console of %s has no %q after %s; it has:\n%s", id, marker, s.opts.Wait, out)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func (s *suite) clientTokenRequired() {
	spec := s.spec("", nil)
	spec.ClientToken = ""
	insts, err := s.p.Launch(s.ctx, spec, 1)
	s.cleanupTerminate(ids(insts))
	if err == nil {
		s.t.Fatalf("Launch without client token: no error, got %+v", insts)
	}
	if got := s.list(s.tags(nil)); len(got) != 0 {
		s.t.Errorf("Launch without client token failed but left instances: %s", describe(got))
	}
}

func (s *suite) clientTokenIdempotent() {
	spec := s.spec("", nil)
	first := s.launch(spec, 2)
	again, err := s.p.Launch(s.ctx, spec, 2)
	s.cleanupTerminate(ids(again))
	if err != nil {
		s.t.Fatalf("second Launch with the same client token: %v", err)
	}
	if got, want := ids(again), ids(first); !slices.Equal(got, want) {
		s.t.Errorf("second Launch with the same client token returned %v, want %v", got, want)
	}
	if got, want := ids(s.list(s.tags(nil))), ids(first); !slices.Equal(got, want) {
		s.t.Errorf("after two Launches with one client token List = %v, want %v", got, want)
	}
}

func (s *suite) listFiltersByTags() {
	red := s.launch(s.spec("", map[string]string{"color": "red", "cloudtest:n": "1"}), 1)[0]
	blue := s.launch(s.spec("", map[string]string{"color": "blue"}), 1)[0]

	got := s.list(s.tags(map[string]string{"color": "red"}))
	if len(got) != 1 || got[0].ID != red.ID {
		s.t.Fatalf("List(color=red) = %s, want only %s", describe(got), red.ID)
	}
	if want := s.tags(map[string]string{"color": "red", "cloudtest:n": "1"}); !maps.Equal(got[0].Tags, want) {
		s.t.Errorf("listed tags = %v, want %v", got[0].Tags, want)
	}
	if got := ids(s.list(s.tags(nil))); !slices.Equal(got, ids([]cloud.Instance{red, blue})) {
		s.t.Errorf("List(run tag) = %v, want %v", got, ids([]cloud.Instance{red, blue}))
	}
	if got := s.list(s.tags(map[string]string{"color": "green"})); len(got) != 0 {
		s.t.Errorf("List(color=green) = %s, want none", describe(got))
	}
	if got := s.list(map[string]string{runTag: s.run + "-other"}); len(got) != 0 {
		s.t.Errorf("List with another run tag value = %s, want none", describe(got))
	}
	all := ids(s.list(nil))
	for _, id := range []string{red.ID, blue.ID} {
		if !slices.Contains(all, id) {
			s.t.Errorf("List(nil) lacks %s", id)
		}
	}
}

func (s *suite) terminateIdempotent() {
	in := s.launch(s.spec("#!/bin/bash\nsleep 600\n", nil), 1)[0]
	s.waitFor("instance running", s.tags(nil), allIn([]string{in.ID}, cloud.StateRunning))
	for i := range 2 {
		done, err := s.p.Terminate(s.ctx, []string{in.ID})
		if err != nil {
			s.t.Fatalf("Terminate #%d: %v", i+1, err)
		}
		if !slices.Equal(done, []string{in.ID}) {
			s.t.Errorf("Terminate #%d returned %v, want [%s]", i+1, done, in.ID)
		}
	}
	done, err := s.p.Terminate(s.ctx, []string{s.opts.UnknownID})
	if err != nil {
		s.t.Errorf("Terminate(unknown id): %v", err)
	}
	if !slices.Equal(done, []string{s.opts.UnknownID}) {
		s.t.Errorf("Terminate(unknown id) returned %v, want it counted as ended", done)
	}
	s.waitFor("instance terminated or gone", s.tags(nil), func(insts []cloud.Instance) bool {
		for _, x := range insts {
			if x.ID == in.ID && x.State != cloud.StateTerminated {
				return false
			}
		}
		return true
	})
}

// terminateConcurrent: a Terminate while another is under way, as when the
// pool terminates again an instance that has been terminating for too long
// (its first Terminate may have crashed, or be slow), succeeds too.
func (s *suite) terminateConcurrent() {
	in := s.launch(s.spec("#!/bin/bash\nsleep 600\n", nil), 1)[0]
	s.waitFor("instance running", s.tags(nil), allIn([]string{in.ID}, cloud.StateRunning))
	type result struct {
		done []string
		err  error
	}
	results := make(chan result, 2)
	for range 2 {
		go func() {
			done, err := s.p.Terminate(s.ctx, []string{in.ID})
			results <- result{done, err}
		}()
	}
	for i := range 2 {
		r := <-results
		if r.err != nil {
			s.t.Errorf("concurrent Terminate #%d: %v", i+1, r.err)
		} else if !slices.Equal(r.done, []string{in.ID}) {
			s.t.Errorf("concurrent Terminate #%d returned %v, want [%s]", i+1, r.done, in.ID)
		}
	}
	s.waitFor("instance terminated or gone", s.tags(nil), func(insts []cloud.Instance) bool {
		for _, x := range insts {
			if x.ID == in.ID && x.State != cloud.StateTerminated {
				return false
			}
		}
		return true
	})
	done, err := s.p.Terminate(s.ctx, []string{in.ID})
	if err != nil || !slices.Equal(done, []string{in.ID}) {
		s.t.Errorf("Terminate of the terminated instance = %v, %v; want [%s], nil", done, err, in.ID)
	}
}

func (s *suite) stopStart() {
	ctx := s.ctx
	if !s.p.Capabilities().StopStart {
		if _, err := s.p.Stop(ctx, []string{s.opts.UnknownID}); !errors.Is(err, cloud.ErrNotSupported) {
			s.t.Errorf("Stop without StopStart capability: %v, want ErrNotSupported", err)
		}
		if _, err := s.p.Start(ctx, []string{s.opts.UnknownID}); !errors.Is(err, cloud.ErrNotSupported) {
			s.t.Errorf("Start without StopStart capability: %v, want ErrNotSupported", err)
		}
		return
	}
	in := s.launch(s.spec("#!/bin/bash\nsleep 600\n", nil), 1)[0]
	s.waitFor("instance running", s.tags(nil), allIn([]string{in.ID}, cloud.StateRunning))

	// An unknown id fails alone; the known one is still stopped.
	done, err := s.p.Stop(ctx, []string{in.ID, s.opts.UnknownID})
	if !errors.Is(err, cloud.ErrNotFound) {
		s.t.Errorf("Stop(known, unknown): %v, want ErrNotFound", err)
	}
	if !slices.Equal(done, []string{in.ID}) {
		s.t.Fatalf("Stop(known, unknown) returned %v, want [%s]", done, in.ID)
	}
	s.waitFor("instance stopped", s.tags(nil), allIn([]string{in.ID}, cloud.StateStopped))

	done, err = s.p.Start(ctx, []string{in.ID, s.opts.UnknownID})
	if !errors.Is(err, cloud.ErrNotFound) {
		s.t.Errorf("Start(known, unknown): %v, want ErrNotFound", err)
	}
	if !slices.Equal(done, []string{in.ID}) {
		s.t.Fatalf("Start(known, unknown) returned %v, want [%s]", done, in.ID)
	}
	s.waitFor("instance running again", s.tags(nil), allIn([]string{in.ID}, cloud.StateRunning))
}

func (s *suite) consoleOutputUnknown() {
	_, err := s.p.ConsoleOutput(s.ctx, s.opts.UnknownID)
	want := cloud.ErrNotFound
	if !s.p.Capabilities().ConsoleOutput {
		want = cloud.ErrNotSupported
	}
	if !errors.Is(err, want) {
		s.t.Errorf("ConsoleOutput(unknown id): %v, want %v", err, want)
	}
}
