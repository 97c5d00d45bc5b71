package sim

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/userdata"
)

// simCloud is the simulated cloud: a launch, stop, start or terminate is
// done when the call returns, and the engine boots what it launches (see
// engine.handle). Instance ids follow from the launch's client token (the
// pool's key for the instance), so they are the same on every run.
type simCloud struct {
	clock *vclock

	mu        sync.Mutex
	instances map[string]*simInstance // by id; terminated ones are dropped
}

type simInstance struct {
	cloud.Instance
	token string // the bootstrap token from its user-data
}

var _ cloud.Provider = (*simCloud)(nil)

func newSimCloud(c *vclock) *simCloud {
	return &simCloud{clock: c, instances: map[string]*simInstance{}}
}

// Stop and start, as EC2 has them: a pool with on_idle = "stop" stops its
// idle instances and starts them again, with a boot, when needed.
func (c *simCloud) Capabilities() cloud.Capabilities { return cloud.Capabilities{StopStart: true} }

func (c *simCloud) Launch(ctx context.Context, spec cloud.LaunchSpec, n int) ([]cloud.Instance, error) {
	if n != 1 || spec.ClientToken == "" {
		return nil, fmt.Errorf("simulated cloud: launches one instance with a client token, not %d with %q", n, spec.ClientToken)
	}
	// The user-data is a script (the engine makes every pool's so): the
	// token is on its export line, as the bootstrap reads it.
	token, ok := userdata.Exports(spec.UserData)["HANGAR_BOOTSTRAP_TOKEN"]
	if !ok {
		return nil, errors.New("simulated cloud: no bootstrap token in the user-data")
	}
	id := "i-" + strings.TrimPrefix(spec.ClientToken, "h-")
	c.mu.Lock()
	defer c.mu.Unlock()
	if in, ok := c.instances[id]; ok {
		return []cloud.Instance{in.copy()}, nil // idempotent, by client token
	}
	in := &simInstance{
		Instance: cloud.Instance{ID: id, State: cloud.StateRunning, Type: "sim", Zone: "sim-1a", Image: spec.Image,
			Tags: maps.Clone(spec.Tags), LaunchedAt: c.clock.Now()},
		token: token,
	}
	c.instances[id] = in
	return []cloud.Instance{in.copy()}, nil
}

func (in *simInstance) copy() cloud.Instance {
	c := in.Instance
	c.Tags = maps.Clone(in.Tags)
	return c
}

// token returns the bootstrap token instance id booted with.
func (c *simCloud) token(id string) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	in, ok := c.instances[id]
	if !ok {
		return "", false
	}
	return in.token, true
}

func (c *simCloud) List(ctx context.Context, tags map[string]string) ([]cloud.Instance, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []cloud.Instance
	for _, id := range slices.Sorted(maps.Keys(c.instances)) {
		if in := c.instances[id]; cloud.MatchesTags(in.Tags, tags) {
			out = append(out, in.copy())
		}
	}
	return out, nil
}

func (c *simCloud) Terminate(ctx context.Context, ids []string) ([]string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, id := range ids {
		delete(c.instances, id)
	}
	return ids, nil
}

func (c *simCloud) Stop(ctx context.Context, ids []string) ([]string, error) {
	return c.set(ids, cloud.StateStopped)
}

func (c *simCloud) Start(ctx context.Context, ids []string) ([]string, error) {
	return c.set(ids, cloud.StateRunning)
}

func (c *simCloud) set(ids []string, s cloud.State) ([]string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var done []string
	var errs []error
	for _, id := range ids {
		in, ok := c.instances[id]
		if !ok {
			errs = append(errs, fmt.Errorf("instance %s: %w", id, cloud.ErrNotFound))
			continue
		}
		in.State = s
		done = append(done, id)
	}
	return done, errors.Join(errs...)
}

func (c *simCloud) ConsoleOutput(ctx context.Context, id string) ([]byte, error) {
	return nil, fmt.Errorf("simulated instance %s has no console: %w", id, cloud.ErrNotFound)
}

func (c *simCloud) Close() error { return nil }
