package pool

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// failingCopier fails its first copies, then copies to "copy-of-ID".
type failingCopier struct {
	mu       sync.Mutex
	failures int
	copies   []string
}

func (c *failingCopier) Region(context.Context, string, string) (cloud.Provider, error) {
	return nil, errors.New("no other regions here")
}

func (c *failingCopier) Resolve(context.Context, cloud.Provider, string) (string, error) {
	return "", errors.New("no other regions here")
}

func (c *failingCopier) Copy(_ context.Context, _ cloud.Provider, id string, _ cloud.Provider) (cloud.Image, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.copies = append(c.copies, id)
	if c.failures > 0 {
		c.failures--
		return cloud.Image{}, errors.New("injected: the copy failed")
	}
	return cloud.Image{ID: "copy-of-" + id, State: cloud.ImageAvailable}, nil
}

// A pool whose image is another pool's bake launches nothing until the
// copy is there: a failed copy is its launch error and is retried after a
// backoff, then its pending lease is served from the copy; a newer bake is
// copied again.
func TestImageCopyWaitsAndRetries(t *testing.T) {
	h := &harness{t: t, clock: newFakeClock()}
	h.cloud = newFakeCloud(h.clock)
	h.opts = testOptions(nil)
	spec := h.opts.Pools["demo"]
	spec.Launch.Image = ""
	spec.ImageFrom = &ImageSource{Pool: "src"}
	h.opts.Pools["demo"] = spec
	src := testOptions(nil).Pools["demo"]
	src.Bake = &BakeSpec{Keep: 1}
	h.opts.Pools["src"] = src
	copier := &failingCopier{failures: 1}
	h.opts.Images = copier
	h.path = t.TempDir() + "/state.db"
	h.open()
	t.Cleanup(h.shutdown)

	v := h.pendingLease(LeaseRequest{Wait: 15 * time.Minute})
	h.m.mu.Lock()
	h.m.pools["src"].bakedImage = "img-baked-1"
	h.m.copyImagesLocked(h.clock.Now())
	h.m.unlock()
	h.settle()
	if p := h.pool(); !strings.Contains(p.LaunchError, "copying the pool's image: injected: the copy failed") || p.Image != "" {
		t.Fatalf("after a failed copy: %+v", p)
	}
	if n := h.cloud.Count("launch"); n != 0 {
		t.Fatalf("%d launches without the image", n)
	}
	// Not before its backoff…
	h.m.mu.Lock()
	h.m.copyImagesLocked(h.clock.Now())
	h.m.unlock()
	h.settle()
	if len(copier.copies) != 1 {
		t.Fatalf("copied again at once: %v", copier.copies)
	}
	// … then again, and the pending lease gets an instance of the copy.
	h.clock.Advance(5 * time.Minute)
	h.m.mu.Lock()
	h.m.copyImagesLocked(h.clock.Now())
	h.m.unlock()
	h.settle()
	if p := h.pool(); p.Image != "copy-of-img-baked-1" || p.LaunchError != "" || p.ImageCopy != "" {
		t.Fatalf("after the retried copy: %+v", p)
	}
	running := h.cloud.Running()
	if len(running) != 1 {
		t.Fatalf("running %v, want the one instance the pending lease asked for", running)
	}
	if in := h.instance(running[0]); in.Image != "copy-of-img-baked-1" {
		t.Fatalf("instance %s launched from %q, want the copy", in.ID, in.Image)
	}
	if l := h.leaseState(v.ID); l != LeasePending {
		t.Fatalf("lease is %s while its instance boots", l)
	}
	// A newer bake is copied again.
	h.m.mu.Lock()
	h.m.pools["src"].bakedImage = "img-baked-2"
	h.m.copyImagesLocked(h.clock.Now())
	h.m.unlock()
	h.settle()
	if p := h.pool(); p.Image != "copy-of-img-baked-2" {
		t.Fatalf("after a newer bake: %+v", p)
	}
}
