package ec2

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/cloudtest"
	"github.com/hangar-ci/hangar/cloud/ec2/ec2test"
)

// The tests here go through the real SDK to ec2test; what they cover is
// what cloudtest.RunStorage does not: key pair conflicts, tag filters,
// paging, throttling, error classes, and EC2's cross-region copies.

// waitFor polls cond until it holds or ctx ends.
func waitFor(t *testing.T, ctx context.Context, what string, cond func() (bool, error)) {
	t.Helper()
	for {
		ok, err := cond()
		if err != nil {
			t.Fatalf("waiting for %s: %v", what, err)
		}
		if ok {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v", what, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func waitVolume(t *testing.T, ctx context.Context, p *Provider, id, state string) cloud.Volume {
	t.Helper()
	var got cloud.Volume
	waitFor(t, ctx, "volume "+id+" "+state, func() (bool, error) {
		vs, err := p.Volumes(ctx, cloud.Filter{IDs: []string{id}})
		if err != nil || len(vs) != 1 {
			return false, err
		}
		got = vs[0]
		return got.State == state, nil
	})
	return got
}

func waitSnapshot(t *testing.T, ctx context.Context, p *Provider, id string) cloud.Snapshot {
	t.Helper()
	var got cloud.Snapshot
	waitFor(t, ctx, "snapshot "+id+" completed", func() (bool, error) {
		ss, err := p.Snapshots(ctx, cloud.Filter{IDs: []string{id}})
		if err != nil || len(ss) != 1 {
			return false, err
		}
		got = ss[0]
		if got.State == cloud.SnapshotError {
			return false, fmt.Errorf("snapshot %s failed", id)
		}
		return got.State == cloud.SnapshotCompleted, nil
	})
	return got
}

func waitImage(t *testing.T, ctx context.Context, p *Provider, id string) cloud.Image {
	t.Helper()
	var got cloud.Image
	waitFor(t, ctx, "image "+id+" available", func() (bool, error) {
		ims, err := p.Images(ctx, cloud.Filter{IDs: []string{id}})
		if err != nil || len(ims) != 1 {
			return false, err
		}
		got = ims[0]
		if got.State == cloud.ImageFailed {
			return false, fmt.Errorf("image %s failed", id)
		}
		return got.State == cloud.ImageAvailable, nil
	})
	return got
}

func volumeIDs(vs []cloud.Volume) []string {
	var out []string
	for _, v := range vs {
		out = append(out, v.ID)
	}
	slices.Sort(out)
	return out
}

func TestStorageProviderBasics(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	p := newProvider(t, srv, nil)
	if p.Region() != "us-east-1" {
		t.Errorf("Region() = %q", p.Region())
	}
	if got := p.Capabilities().SSHPort; got != 22 {
		t.Errorf("default SSHPort %d, want 22", got)
	}
	if got := newProvider(t, srv, func(o *Options) { o.SSHPort = 2222 }).Capabilities().SSHPort; got != 2222 {
		t.Errorf("SSHPort %d, want 2222", got)
	}
	for _, port := range []int{-1, 65536} {
		_, err := New(context.Background(), Options{Region: "us-east-1", Endpoint: srv.URL(), SSHPort: port})
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("ssh port %d", port)) {
			t.Errorf("SSHPort %d: error %v", port, err)
		}
	}
}

func TestStorageKeyPairConflict(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	for _, tc := range []struct {
		name string
		edit func(*Options)
	}{
		{"stored key", nil},
		{"fingerprint", func(o *Options) {
			// A cloud that does not know IncludePublicKey: only the
			// fingerprint is left to compare.
			ft := newFaultyTransport()
			ft.reject["IncludePublicKey=true"] = "InvalidParameterValue"
			o.HTTPClient = &http.Client{Transport: ft}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newProvider(t, srv, tc.edit)
			ctx := testCtx(t)
			for _, key := range []string{testEd25519Key, testRSAKey} {
				name := strings.ReplaceAll(tc.name, " ", "-") + "-" + strings.Fields(key)[0]
				other := testRSAKey
				if key == testRSAKey {
					other = testEd25519Key
				}
				if err := p.ImportKeyPair(ctx, name, []byte(key)); err != nil {
					t.Fatal(err)
				}
				// Again, with another comment: the same key, so no error.
				if err := p.ImportKeyPair(ctx, name, []byte(strings.Replace(key, "root@vm", "again", 1)+"\n")); err != nil {
					t.Errorf("importing the same key again: %v", err)
				}
				err := p.ImportKeyPair(ctx, name, []byte(other))
				if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("%q", name)) || !strings.Contains(err.Error(), "different key") {
					t.Errorf("another key under %s: error %v, want one naming the key pair and saying the key differs", name, err)
				}
			}
		})
	}
	t.Run("bad input", func(t *testing.T) {
		p := newProvider(t, srv, nil)
		ctx := testCtx(t)
		before := srv.Calls()["ImportKeyPair"]
		if err := p.ImportKeyPair(ctx, "k", []byte("not a key")); err == nil || !strings.Contains(err.Error(), "authorized_keys") {
			t.Errorf("bad key: %v", err)
		}
		if err := p.ImportKeyPair(ctx, "", []byte(testEd25519Key)); err == nil || !strings.Contains(err.Error(), "no name") {
			t.Errorf("no name: %v", err)
		}
		if n := srv.Calls()["ImportKeyPair"] - before; n != 0 {
			t.Errorf("%d requests sent for bad input", n)
		}
	})
}

func TestStorageTagFilters(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	p := newProvider(t, srv, nil)
	ctx := testCtx(t)
	tagSets := []map[string]string{
		{"stage": "a", "role": "data"},
		{"stage": "a", "role": "root"},
		{"stage": "b", "role": "data"},
		{"stage": "a*"}, // a wildcard that must be taken literally
	}
	var vols []cloud.Volume
	var snaps []cloud.Snapshot
	for _, tags := range tagSets {
		v, err := p.CreateVolume(ctx, cloud.VolumeSpec{Zone: "us-east-1a", SizeGB: 1, Tags: tags})
		if err != nil {
			t.Fatal(err)
		}
		if v.ID == "" || v.Zone != "us-east-1a" || v.SizeGB != 1 {
			t.Errorf("CreateVolume returned %+v", v)
		}
		vols = append(vols, v)
		s, err := p.CreateSnapshot(ctx, v.ID, "of "+v.ID, tags)
		if err != nil {
			t.Fatal(err)
		}
		if s.VolumeID != v.ID || s.Description != "of "+v.ID {
			t.Errorf("CreateSnapshot returned %+v", s)
		}
		snaps = append(snaps, s)
	}
	tests := []struct {
		name string
		f    cloud.Filter
		want []int
	}{
		{"one tag", cloud.Filter{Tags: map[string]string{"stage": "a"}}, []int{0, 1}},
		{"two tags", cloud.Filter{Tags: map[string]string{"stage": "a", "role": "data"}}, []int{0}},
		{"literal wildcard", cloud.Filter{Tags: map[string]string{"stage": "a*"}}, []int{3}},
		{"ids", cloud.Filter{IDs: []string{vols[1].ID, vols[2].ID}}, []int{1, 2}},
		{"ids and tags", cloud.Filter{IDs: []string{vols[1].ID, vols[2].ID}, Tags: map[string]string{"role": "data"}}, []int{2}},
		{"no match", cloud.Filter{Tags: map[string]string{"stage": "c"}}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.f
			var want, wantSnaps []string
			for _, i := range tc.want {
				want = append(want, vols[i].ID)
				wantSnaps = append(wantSnaps, snaps[i].ID)
			}
			slices.Sort(want)
			slices.Sort(wantSnaps)
			got, err := p.Volumes(ctx, f)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(volumeIDs(got), want) {
				t.Errorf("volumes %v, want %v", volumeIDs(got), want)
			}
			if len(f.IDs) > 0 {
				// Snapshot filters name snapshot ids.
				f.IDs = nil
				for _, i := range []int{1, 2} {
					f.IDs = append(f.IDs, snaps[i].ID)
				}
			}
			ss, err := p.Snapshots(ctx, f)
			if err != nil {
				t.Fatal(err)
			}
			var gotSnaps []string
			for _, s := range ss {
				gotSnaps = append(gotSnaps, s.ID)
			}
			slices.Sort(gotSnaps)
			if !slices.Equal(gotSnaps, wantSnaps) {
				t.Errorf("snapshots %v, want %v", gotSnaps, wantSnaps)
			}
		})
	}
	for _, v := range must(p.Volumes(ctx, cloud.Filter{IDs: []string{vols[0].ID}}))(t) {
		if v.Tags["role"] != "data" || v.Tags["stage"] != "a" {
			t.Errorf("volume tags %v", v.Tags)
		}
	}
}

// must fails the test on err: must(call())(t).
func must[T any](v T, err error) func(*testing.T) T {
	return func(t *testing.T) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

func TestStoragePagination(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	p := newProvider(t, srv, func(o *Options) { o.pageSize = 5 })
	ctx := testCtx(t)
	const n = 12
	tags := map[string]string{cloud.TagPool: "paged"}
	var want, wantSnaps []string
	for i := range n {
		v, err := p.CreateVolume(ctx, cloud.VolumeSpec{Zone: "us-east-1b", SizeGB: 1 + i, Tags: tags})
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, v.ID)
		s, err := p.CreateSnapshot(ctx, v.ID, "", tags)
		if err != nil {
			t.Fatal(err)
		}
		wantSnaps = append(wantSnaps, s.ID)
	}
	// Others, which the tag filter leaves out.
	if _, err := p.CreateVolume(ctx, cloud.VolumeSpec{Zone: "us-east-1b", SizeGB: 1}); err != nil {
		t.Fatal(err)
	}
	slices.Sort(want)
	slices.Sort(wantSnaps)

	before := srv.Calls()["DescribeVolumes"]
	vols := must(p.Volumes(ctx, cloud.Filter{Tags: tags}))(t)
	if calls := srv.Calls()["DescribeVolumes"] - before; calls < 3 {
		t.Errorf("listing %d volumes in pages of 5 took %d requests, want at least 3", n, calls)
	}
	if !slices.Equal(volumeIDs(vols), want) {
		t.Errorf("volumes %v, want %v", volumeIDs(vols), want)
	}

	before = srv.Calls()["DescribeSnapshots"]
	snaps := must(p.Snapshots(ctx, cloud.Filter{Tags: tags}))(t)
	if calls := srv.Calls()["DescribeSnapshots"] - before; calls < 3 {
		t.Errorf("listing %d snapshots in pages of 5 took %d requests, want at least 3", n, calls)
	}
	var gotSnaps []string
	for _, s := range snaps {
		gotSnaps = append(gotSnaps, s.ID)
	}
	slices.Sort(gotSnaps)
	if !slices.Equal(gotSnaps, wantSnaps) {
		t.Errorf("snapshots %v, want %v", gotSnaps, wantSnaps)
	}
}

func TestStorageNotFound(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{Regions: []string{"us-east-1", "us-west-2"}})
	p := newProvider(t, srv, nil)
	ctx := testCtx(t)
	const (
		vol  = "vol-0123456789abcdef0"
		snap = "snap-0123456789abcdef0"
		ami  = "ami-0fedcba9876543210"
	)
	// Deleting what is not there succeeds: deleting is idempotent.
	for what, err := range map[string]error{
		"DeleteVolume":    p.DeleteVolume(ctx, vol),
		"DeleteSnapshot":  p.DeleteSnapshot(ctx, snap),
		"DeregisterImage": p.DeregisterImage(ctx, ami),
	} {
		if err != nil {
			t.Errorf("%s of an unknown id: %v", what, err)
		}
	}
	inst := must(p.Launch(ctx, launchSpec("nf"), 1))(t)[0]
	west := newProvider(t, srv, func(o *Options) { o.Region = "us-west-2" })
	for what, call := range map[string]func() error{
		"AttachVolume":   func() error { _, err := p.AttachVolume(ctx, vol, inst.ID, "/dev/sdf"); return err },
		"DetachVolume":   func() error { _, err := p.DetachVolume(ctx, vol, false); return err },
		"CreateSnapshot": func() error { _, err := p.CreateSnapshot(ctx, vol, "", nil); return err },
		"CreateVolume": func() error {
			_, err := p.CreateVolume(ctx, cloud.VolumeSpec{Zone: inst.Zone, SnapshotID: snap})
			return err
		},
		"CopySnapshot": func() error { _, err := west.CopySnapshot(ctx, "us-east-1", snap, "", nil); return err },
		"CopyImage": func() error {
			_, err := west.CopyImage(ctx, "us-east-1", ami, cloud.ImageSpec{Name: "copy"})
			return err
		},
		"CreateImage": func() error {
			_, err := p.CreateImage(ctx, "i-0123456789abcdef0", cloud.ImageSpec{Name: "img"})
			return err
		},
		"RegisterImage": func() error {
			_, err := p.RegisterImage(ctx, cloud.ImageSpec{Name: "img", Devices: []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: snap}}})
			return err
		},
	} {
		err := call()
		if !errors.Is(err, cloud.ErrNotFound) {
			t.Errorf("%s of an unknown id: %v, want ErrNotFound", what, err)
		}
	}
	// A listing by unknown ids is empty, not an error.
	if vs, err := p.Volumes(ctx, cloud.Filter{IDs: []string{vol}}); err != nil || len(vs) != 0 {
		t.Errorf("Volumes of an unknown id: %v, %v", vs, err)
	}
	if ss, err := p.Snapshots(ctx, cloud.Filter{IDs: []string{snap}}); err != nil || len(ss) != 0 {
		t.Errorf("Snapshots of an unknown id: %v, %v", ss, err)
	}
	if ims, err := p.Images(ctx, cloud.Filter{IDs: []string{ami}}); err != nil || len(ims) != 0 {
		t.Errorf("Images of an unknown id: %v, %v", ims, err)
	}
	// Bad input is refused before any request.
	calls := srv.Calls()
	for what, err := range map[string]error{
		"CreateVolume without zone":   second(p.CreateVolume(ctx, cloud.VolumeSpec{SizeGB: 1})),
		"CreateVolume without size":   second(p.CreateVolume(ctx, cloud.VolumeSpec{Zone: "us-east-1a"})),
		"CreateVolume too large":      second(p.CreateVolume(ctx, cloud.VolumeSpec{Zone: "us-east-1a", SizeGB: 1 << 31})),
		"AttachVolume without device": second(p.AttachVolume(ctx, vol, inst.ID, "")),
		"CopySnapshot without region": second(west.CopySnapshot(ctx, "", snap, "", nil)),
		"CopyImage without name":      second(west.CopyImage(ctx, "us-east-1", ami, cloud.ImageSpec{})),
		"DeleteVolume without id":     p.DeleteVolume(ctx, ""),
	} {
		if err == nil {
			t.Errorf("%s: no error", what)
		}
	}
	after := srv.Calls()
	for action, n := range after {
		if n != calls[action] {
			t.Errorf("bad input sent %d %s", n-calls[action], action)
		}
	}
}

func second[T any](_ T, err error) error { return err }

func TestStorageAttachDetach(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{VolumeDelay: 50 * time.Millisecond})
	p := newProvider(t, srv, nil)
	ctx := testCtx(t)
	inst := must(p.Launch(ctx, launchSpec("att"), 1))(t)[0]
	v := must(p.CreateVolume(ctx, cloud.VolumeSpec{Zone: inst.Zone, SizeGB: 4, ClientToken: "att-vol-1"}))(t)
	// The same token names the same volume: a retry creates no second one.
	again := must(p.CreateVolume(ctx, cloud.VolumeSpec{Zone: inst.Zone, SizeGB: 4, ClientToken: "att-vol-1"}))(t)
	if again.ID != v.ID {
		t.Errorf("CreateVolume with the same client token made %s and %s", v.ID, again.ID)
	}
	waitVolume(t, ctx, p, v.ID, cloud.VolumeAvailable)

	a := must(p.AttachVolume(ctx, v.ID, inst.ID, "/dev/sdf"))(t)
	if a.ID != v.ID || a.InstanceID != inst.ID || a.Device != "/dev/sdf" || a.State != cloud.VolumeInUse ||
		(a.AttachmentState != "attaching" && a.AttachmentState != "attached") {
		t.Errorf("AttachVolume returned %+v", a)
	}
	var listed cloud.Volume
	waitFor(t, ctx, "attached", func() (bool, error) {
		vs, err := p.Volumes(ctx, cloud.Filter{IDs: []string{v.ID}})
		if err != nil || len(vs) != 1 {
			return false, err
		}
		listed = vs[0]
		return listed.AttachmentState == "attached", nil
	})
	if listed.State != cloud.VolumeInUse || listed.InstanceID != inst.ID || listed.Device != "/dev/sdf" {
		t.Errorf("attached volume listed as %+v", listed)
	}
	if err := p.DeleteVolume(ctx, v.ID); err == nil {
		t.Error("deleting an attached volume succeeded")
	}

	d := must(p.DetachVolume(ctx, v.ID, false))(t)
	if d.ID != v.ID || d.InstanceID != inst.ID || (d.AttachmentState != "detaching" && d.AttachmentState != "detached") {
		t.Errorf("DetachVolume returned %+v", d)
	}
	free := waitVolume(t, ctx, p, v.ID, cloud.VolumeAvailable)
	if free.InstanceID != "" || free.AttachmentState != "" {
		t.Errorf("detached volume still shows an attachment: %+v", free)
	}
	if err := p.DeleteVolume(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, "volume gone", func() (bool, error) {
		vs, err := p.Volumes(ctx, cloud.Filter{IDs: []string{v.ID}})
		return len(vs) == 0 || vs[0].State == cloud.VolumeDeleting, err
	})
	if err := p.DeleteVolume(ctx, v.ID); err != nil {
		t.Errorf("deleting it again: %v", err)
	}
}

func TestStorageImages(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{SnapshotDelay: 50 * time.Millisecond, ImageDelay: 50 * time.Millisecond})
	p := newProvider(t, srv, nil)
	ctx := testCtx(t)
	tags := map[string]string{cloud.TagPool: "img"}

	inst := must(p.Launch(ctx, launchSpec("img"), 1))(t)[0]
	created := must(p.CreateImage(ctx, inst.ID, cloud.ImageSpec{Name: "hangar-created", Description: "from an instance", Tags: tags}))(t)
	if created.ID == "" || created.State != cloud.ImagePending || created.Name != "hangar-created" {
		t.Errorf("CreateImage returned %+v", created)
	}
	img := waitImage(t, ctx, p, created.ID)
	if img.Name != "hangar-created" || img.Description != "from an instance" || img.Tags[cloud.TagPool] != "img" ||
		len(img.Devices) == 0 || img.Devices[0].SnapshotID == "" || img.RootDevice == "" {
		t.Errorf("created image listed as %+v", img)
	}
	// Its snapshots carry the tags, so that leftovers can be found.
	if ss := must(p.Snapshots(ctx, cloud.Filter{IDs: []string{img.Devices[0].SnapshotID}, Tags: tags}))(t); len(ss) != 1 {
		t.Errorf("the image's snapshot %s is not tagged %v", img.Devices[0].SnapshotID, tags)
	}

	v := must(p.CreateVolume(ctx, cloud.VolumeSpec{Zone: "us-east-1a", SizeGB: 3}))(t)
	snap := must(p.CreateSnapshot(ctx, v.ID, "root", nil))(t)
	waitSnapshot(t, ctx, p, snap.ID)
	reg := must(p.RegisterImage(ctx, cloud.ImageSpec{
		Name: "hangar-registered", Tags: tags,
		Devices: []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: snap.ID, SizeGB: 10}},
	}))(t)
	if reg.State != cloud.ImagePending || reg.Architecture != "x86_64" || reg.RootDevice != "/dev/xvda" {
		t.Errorf("RegisterImage returned %+v", reg)
	}
	regd := waitImage(t, ctx, p, reg.ID)
	want := []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: snap.ID, SizeGB: 10}}
	if regd.Architecture != "x86_64" || regd.RootDevice != "/dev/xvda" || !slices.Equal(regd.Devices, want) {
		t.Errorf("registered image listed as %+v, want devices %+v", regd, want)
	}
	// It boots.
	spec := launchSpec("from-registered")
	spec.Image = reg.ID
	booted := must(p.Launch(ctx, spec, 1))(t)
	if booted[0].Image != reg.ID {
		t.Errorf("launched %s, want image %s", booted[0].Image, reg.ID)
	}

	all := must(p.Images(ctx, cloud.Filter{Tags: tags}))(t)
	var names []string
	for _, im := range all {
		names = append(names, im.Name)
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"hangar-created", "hangar-registered"}) {
		t.Errorf("images tagged %v: %v", tags, names)
	}
	if err := p.DeregisterImage(ctx, reg.ID); err != nil {
		t.Fatal(err)
	}
	if ims := must(p.Images(ctx, cloud.Filter{IDs: []string{reg.ID}}))(t); len(ims) != 0 {
		t.Errorf("deregistered image still listed: %+v", ims)
	}
	if err := p.DeregisterImage(ctx, reg.ID); err != nil {
		t.Errorf("deregistering again: %v", err)
	}
	// The snapshot stays: it was not the image's to delete.
	if ss := must(p.Snapshots(ctx, cloud.Filter{IDs: []string{snap.ID}}))(t); len(ss) != 1 {
		t.Error("deregistering the image deleted its snapshot")
	}
	if err := p.DeleteSnapshot(ctx, snap.ID); err != nil {
		t.Fatal(err)
	}
	if err := p.DeleteSnapshot(ctx, snap.ID); err != nil {
		t.Errorf("deleting it again: %v", err)
	}
}

// bodyRecorder keeps the bodies of the requests of one action.
type bodyRecorder struct {
	action string
	mu     sync.Mutex
	bodies []url.Values
}

func (b *bodyRecorder) RoundTrip(r *http.Request) (*http.Response, error) {
	body, err := io.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		return nil, err
	}
	if q, err := url.ParseQuery(string(body)); err == nil && q.Get("Action") == b.action {
		b.mu.Lock()
		b.bodies = append(b.bodies, q)
		b.mu.Unlock()
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	return http.DefaultTransport.RoundTrip(r)
}

// TestStorageCrossRegion copies a snapshot and an image from one region
// to another of one ec2test server, through a custom endpoint: the SDK's
// presigned URL for the source region must be made without failing on
// the provider's own middleware.
func TestStorageCrossRegion(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{Regions: []string{"us-east-1", "us-west-2"}, SnapshotDelay: 50 * time.Millisecond})
	obs := newObserver()
	east := newProvider(t, srv, nil)
	rec := &bodyRecorder{action: "CopySnapshot"}
	west := newProvider(t, srv, func(o *Options) {
		o.Region = "us-west-2"
		o.HTTPClient = &http.Client{Transport: rec}
		o.Observe = obs.observe
	})
	ctx := testCtx(t)
	tags := map[string]string{cloud.TagPool: "xr"}

	v := must(east.CreateVolume(ctx, cloud.VolumeSpec{Zone: "us-east-1a", SizeGB: 2}))(t)
	snap := must(east.CreateSnapshot(ctx, v.ID, "source", nil))(t)
	waitSnapshot(t, ctx, east, snap.ID)

	cp := must(west.CopySnapshot(ctx, "us-east-1", snap.ID, "copied", tags))(t)
	if cp.ID == "" || cp.ID == snap.ID || cp.State != cloud.SnapshotPending || cp.Description != "copied" || cp.Tags[cloud.TagPool] != "xr" {
		t.Errorf("CopySnapshot returned %+v", cp)
	}
	done := waitSnapshot(t, ctx, west, cp.ID)
	if done.Tags[cloud.TagPool] != "xr" || done.SizeGB != 2 {
		t.Errorf("copy listed as %+v", done)
	}
	if ss := must(east.Snapshots(ctx, cloud.Filter{IDs: []string{cp.ID}}))(t); len(ss) != 0 {
		t.Errorf("the copy is listed in the source region: %+v", ss)
	}
	if ss := must(west.Snapshots(ctx, cloud.Filter{IDs: []string{snap.ID}}))(t); len(ss) != 0 {
		t.Errorf("the source is listed in the destination region: %+v", ss)
	}

	// The SDK presigned the source region's request against the custom
	// endpoint; the presigning sent nothing the provider had to pace.
	rec.mu.Lock()
	bodies := slices.Clone(rec.bodies)
	rec.mu.Unlock()
	if len(bodies) != 1 {
		t.Fatalf("%d CopySnapshot requests, want 1", len(bodies))
	}
	pre, err := url.Parse(bodies[0].Get("PresignedUrl"))
	if err != nil || pre.Host != strings.TrimPrefix(srv.URL(), "http://") {
		t.Errorf("PresignedUrl %q does not go to the test endpoint (%v)", bodies[0].Get("PresignedUrl"), err)
	} else if q := pre.Query(); !strings.Contains(q.Get("X-Amz-Credential"), "/us-east-1/ec2/") || q.Get("DestinationRegion") != "us-west-2" {
		t.Errorf("PresignedUrl query %v: want it signed for us-east-1 with DestinationRegion us-west-2", q)
	}
	if calls, _ := obs.snapshot(); calls["CopySnapshot"] != 1 {
		t.Errorf("observed %d CopySnapshot requests, want 1", calls["CopySnapshot"])
	}

	// Images copy with EC2's own call.
	reg := must(east.RegisterImage(ctx, cloud.ImageSpec{Name: "xr-source", Devices: []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: snap.ID}}}))(t)
	waitImage(t, ctx, east, reg.ID)
	ci := must(west.CopyImage(ctx, "us-east-1", reg.ID, cloud.ImageSpec{Name: "xr-copy", Description: "d", Tags: tags, ClientToken: "xr-copy-1"}))(t)
	if ci.ID == "" || ci.ID == reg.ID || ci.State != cloud.ImagePending || ci.Name != "xr-copy" {
		t.Errorf("CopyImage returned %+v", ci)
	}
	again := must(west.CopyImage(ctx, "us-east-1", reg.ID, cloud.ImageSpec{Name: "xr-copy", Description: "d", Tags: tags, ClientToken: "xr-copy-1"}))(t)
	if again.ID != ci.ID {
		t.Errorf("CopyImage with the same client token made %s and %s", ci.ID, again.ID)
	}
	copied := waitImage(t, ctx, west, ci.ID)
	if copied.Name != "xr-copy" || copied.Tags[cloud.TagPool] != "xr" || len(copied.Devices) != 1 || copied.Devices[0].SnapshotID == snap.ID {
		t.Fatalf("image copy listed as %+v; want its own snapshot", copied)
	}
	if ss := must(west.Snapshots(ctx, cloud.Filter{IDs: []string{copied.Devices[0].SnapshotID}, Tags: tags}))(t); len(ss) != 1 {
		t.Errorf("the image copy's snapshot %s is not tagged %v", copied.Devices[0].SnapshotID, tags)
	}
}

// TestStorageThrottled runs the storage calls with 30% of requests
// throttled: the client's retries absorb it, and every request is seen by
// Observe.
func TestStorageThrottled(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	srv.Throttle("", 0.3)
	obs := newObserver()
	p := newProvider(t, srv, func(o *Options) {
		o.Observe = obs.observe
		o.backoff = func(attempt int) time.Duration { return time.Duration(attempt) * 10 * time.Millisecond }
		// A throttle drains the action's bucket; ten times AWS's buckets
		// keep the refill waits short, as in TestThrottling.
		lim := DefaultRateLimits()
		lim.NonMutating = Bucket{Size: 1000, PerSecond: 200}
		lim.Mutating = Bucket{Size: 500, PerSecond: 50}
		o.RateLimits = &lim
	})
	ctx := testCtx(t)
	tags := map[string]string{cloud.TagPool: "thr"}
	for i := range 5 {
		if err := p.ImportKeyPair(ctx, fmt.Sprintf("thr-%d", i), []byte(testEd25519Key)); err != nil {
			t.Fatal(err)
		}
		v, err := p.CreateVolume(ctx, cloud.VolumeSpec{Zone: "us-east-1a", SizeGB: 1, Tags: tags})
		if err != nil {
			t.Fatal(err)
		}
		waitVolume(t, ctx, p, v.ID, cloud.VolumeAvailable)
		s, err := p.CreateSnapshot(ctx, v.ID, "", tags)
		if err != nil {
			t.Fatal(err)
		}
		waitSnapshot(t, ctx, p, s.ID)
		im, err := p.RegisterImage(ctx, cloud.ImageSpec{Name: fmt.Sprintf("thr-%d", i), Tags: tags, Devices: []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: s.ID}}})
		if err != nil {
			t.Fatal(err)
		}
		waitImage(t, ctx, p, im.ID)
		for _, err := range []error{p.DeregisterImage(ctx, im.ID), p.DeleteSnapshot(ctx, s.ID), p.DeleteVolume(ctx, v.ID)} {
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	if vs := must(p.Volumes(ctx, cloud.Filter{Tags: tags}))(t); len(slices.DeleteFunc(vs, func(v cloud.Volume) bool { return v.State == cloud.VolumeDeleting })) != 0 {
		t.Errorf("volumes left: %+v", vs)
	}
	calls, codes := obs.snapshot()
	throttled := 0
	for action, c := range srv.Calls() {
		if calls[action] != c {
			t.Errorf("observed %d %s requests, ec2test counted %d", calls[action], action, c)
		}
	}
	for k, c := range srv.Errors() {
		if strings.HasSuffix(k, "/RequestLimitExceeded") {
			throttled += c
			if codes[k] != c {
				t.Errorf("observed %d %s, ec2test sent %d", codes[k], k, c)
			}
		}
	}
	if throttled == 0 {
		t.Error("nothing was throttled")
	}
}

// TestStorageConformance runs the provider-neutral storage contract
// against ec2test's in-memory regions, with volumes, snapshots and images
// that take a while, and a second region for CopySnapshot.
func TestStorageConformance(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{
		Regions:       []string{"us-east-1", "eu-west-1"},
		VolumeDelay:   100 * time.Millisecond,
		SnapshotDelay: 200 * time.Millisecond,
		ImageDelay:    200 * time.Millisecond,
	})
	cloudtest.RunStorage(t, func(t *testing.T) cloud.Provider {
		return newProvider(t, srv, nil)
	}, cloudtest.StorageOptions{
		Image:         ec2test.DefaultImageID,
		InstanceTypes: []string{"t3.small"},
		Zone:          "us-east-1a",
		Wait:          time.Minute,
		OtherRegion: func(t *testing.T) cloud.Storage {
			return newProvider(t, srv, func(o *Options) { o.Region = "eu-west-1" })
		},
	})
}
