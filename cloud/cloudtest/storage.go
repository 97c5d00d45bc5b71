package cloudtest

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/cloud"
)

// StorageOptions adapts the storage suite to a provider.
type StorageOptions struct {
	// Image and InstanceTypes to launch the instance volumes are attached
	// to. Defaults suit the local cloud.
	Image         string
	InstanceTypes []string
	// Zone to make volumes and launch the instance in (default "local-1a").
	Zone string
	// Wait bounds each wait for a state change: volumes creating→available,
	// snapshots pending→completed, attachments, instances (default 30s).
	Wait time.Duration
	// OtherRegion, if set, returns the same cloud's storage in another
	// region, for CopySnapshot; it arranges its own clean-up.
	OtherRegion func(t *testing.T) cloud.Storage
	// UnknownVolumeID is a volume id in the provider's format that names no
	// volume (default "vol-0000000000000000f").
	UnknownVolumeID string
}

// RunStorage runs the cloud.Storage suite. newProvider returns a fresh
// provider that also implements cloud.Storage, and arranges its Close with
// t.Cleanup. Everything the suite makes is removed in t.Cleanup, except key
// pairs (the contract cannot delete them).
//
// It polls for every state, so it holds a cloud whose operations finish at
// once (local) and one whose volumes and snapshots take a while (EC2) to
// the same contract.
func RunStorage(t *testing.T, newProvider func(t *testing.T) cloud.Provider, opts StorageOptions) {
	if opts.Image == "" {
		opts.Image = "local"
	}
	if opts.Zone == "" {
		opts.Zone = "local-1a"
	}
	if opts.Wait <= 0 {
		opts.Wait = 30 * time.Second
	}
	if opts.UnknownVolumeID == "" {
		opts.UnknownVolumeID = "vol-0000000000000000f"
	}
	tests := []struct {
		name string
		run  func(*storageSuite)
	}{
		{"KeyPairs", (*storageSuite).keyPairs},
		{"VolumeLifecycle", (*storageSuite).volumeLifecycle},
		{"Snapshots", (*storageSuite).snapshots},
		{"CopySnapshot", (*storageSuite).copySnapshot},
		{"Images", (*storageSuite).images},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// Generous: a subtest waits for several states in turn.
			ctx, cancel := context.WithTimeout(context.Background(), 8*opts.Wait)
			t.Cleanup(cancel)
			p := newProvider(t)
			st, ok := p.(cloud.Storage)
			if !ok {
				t.Fatalf("provider %T does not implement cloud.Storage", p)
			}
			tc.run(&storageSuite{t: t, ctx: ctx, p: p, st: st, opts: opts, run: randHex(8)})
		})
	}
}

type storageSuite struct {
	t    *testing.T
	ctx  context.Context
	p    cloud.Provider
	st   cloud.Storage
	opts StorageOptions
	run  string
}

func (s *storageSuite) tags(extra map[string]string) map[string]string {
	tags := map[string]string{runTag: s.run}
	maps.Copy(tags, extra)
	return tags
}

// poll calls check until it reports done, for at most opts.Wait, backing
// off from 50ms to 1s between calls. check returns what it saw, for the
// failure message.
func (s *storageSuite) poll(what string, check func() (done bool, saw string)) {
	s.t.Helper()
	deadline := time.Now().Add(s.opts.Wait)
	pause := 50 * time.Millisecond
	for {
		done, saw := check()
		if done {
			return
		}
		if time.Now().After(deadline) || s.ctx.Err() != nil {
			s.t.Fatalf("waited %s for %s; last saw %s", s.opts.Wait, what, saw)
		}
		time.Sleep(pause)
		pause = min(pause*3/2, time.Second)
	}
}

func authorizedKey(t *testing.T) []byte {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	k, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return ssh.MarshalAuthorizedKey(k)
}

func (s *storageSuite) keyPairs() {
	name := "cloudtest-" + s.run
	key := authorizedKey(s.t)
	for i := range 2 {
		if err := s.st.ImportKeyPair(s.ctx, name, key); err != nil {
			s.t.Fatalf("ImportKeyPair #%d of the same key: %v", i+1, err)
		}
	}
	if err := s.st.ImportKeyPair(s.ctx, name, authorizedKey(s.t)); err == nil {
		s.t.Errorf("ImportKeyPair of another key under the taken name %q succeeded", name)
	}
	if err := s.st.ImportKeyPair(s.ctx, "cloudtest-bad-"+s.run, []byte("not a key\n")); err == nil {
		s.t.Errorf("ImportKeyPair of a malformed key succeeded")
	}
}

// volume returns the volume with id as listed, and whether it is listed.
func (s *storageSuite) volume(st cloud.Storage, id string) (cloud.Volume, bool) {
	s.t.Helper()
	vs, err := st.Volumes(s.ctx, cloud.Filter{IDs: []string{id}})
	if err != nil {
		s.t.Fatalf("Volumes(%s): %v", id, err)
	}
	for _, v := range vs {
		if v.ID == id {
			return v, true
		}
	}
	return cloud.Volume{}, false
}

// waitVolume polls until the volume is listed and ok holds for it.
func (s *storageSuite) waitVolume(id, what string, ok func(cloud.Volume) bool) cloud.Volume {
	s.t.Helper()
	var v cloud.Volume
	s.poll(fmt.Sprintf("volume %s %s", id, what), func() (bool, string) {
		var listed bool
		v, listed = s.volume(s.st, id)
		return listed && ok(v), fmt.Sprintf("%+v (listed %v)", v, listed)
	})
	return v
}

func available(v cloud.Volume) bool { return v.State == cloud.VolumeAvailable }

// createVolume creates a volume, deleted at clean-up, and waits until it is
// available.
func (s *storageSuite) createVolume(spec cloud.VolumeSpec) cloud.Volume {
	s.t.Helper()
	v, err := s.st.CreateVolume(s.ctx, spec)
	if err != nil {
		s.t.Fatalf("CreateVolume(%+v): %v", spec, err)
	}
	s.cleanupVolume(v.ID)
	if v.ID == "" {
		s.t.Fatalf("CreateVolume returned no id: %+v", v)
	}
	return s.waitVolume(v.ID, "available", available)
}

func (s *storageSuite) cleanupVolume(id string) {
	s.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), s.opts.Wait)
		defer cancel()
		if s.st.DeleteVolume(ctx, id) == nil {
			return
		}
		// Still attached (the test failed half-way): detach, wait, retry.
		_, _ = s.st.DetachVolume(ctx, id, true)
		for ctx.Err() == nil {
			vs, err := s.st.Volumes(ctx, cloud.Filter{IDs: []string{id}})
			if err == nil && (len(vs) == 0 || vs[0].State == cloud.VolumeAvailable) {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if err := s.st.DeleteVolume(ctx, id); err != nil {
			s.t.Errorf("cleanup: DeleteVolume(%s): %v", id, err)
		}
	})
}

func (s *storageSuite) launchInstance() cloud.Instance {
	s.t.Helper()
	tags := s.tags(map[string]string{"cloudtest:role": "attach-target"})
	insts, err := s.p.Launch(s.ctx, cloud.LaunchSpec{
		Image:         s.opts.Image,
		InstanceTypes: s.opts.InstanceTypes,
		Zones:         []string{s.opts.Zone},
		UserData:      []byte("#!/bin/bash\nsleep 600\n"),
		Tags:          tags,
		ClientToken:   "cloudtest-" + randHex(12),
	}, 1)
	if len(insts) > 0 {
		id := insts[0].ID
		s.t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), s.opts.Wait)
			defer cancel()
			if _, err := s.p.Terminate(ctx, []string{id}); err != nil {
				s.t.Errorf("cleanup: Terminate(%s): %v", id, err)
			}
		})
	}
	if err != nil || len(insts) != 1 {
		s.t.Fatalf("Launch: %v, %+v", err, insts)
	}
	var in cloud.Instance
	s.poll("instance "+insts[0].ID+" running", func() (bool, string) {
		list, err := s.p.List(s.ctx, tags)
		if err != nil {
			s.t.Fatalf("List: %v", err)
		}
		for _, x := range list {
			if x.ID == insts[0].ID {
				in = x
				return x.State == cloud.StateRunning, x.State.String()
			}
		}
		return false, "not listed"
	})
	return in
}

func (s *storageSuite) volumeLifecycle() {
	tags := s.tags(map[string]string{"cloudtest:kind": "lifecycle"})
	v := s.createVolume(cloud.VolumeSpec{Zone: s.opts.Zone, SizeGB: 1, Tags: tags})
	if v.SizeGB != 1 || v.Zone != s.opts.Zone || !maps.Equal(v.Tags, tags) || v.InstanceID != "" {
		s.t.Errorf("new volume = %+v, want 1 GiB in %s with tags %v, unattached", v, s.opts.Zone, tags)
	}
	other := s.createVolume(cloud.VolumeSpec{Zone: s.opts.Zone, SizeGB: 1, Tags: s.tags(nil)})

	byTags, err := s.st.Volumes(s.ctx, cloud.Filter{Tags: tags})
	if err != nil {
		s.t.Fatalf("Volumes(tags): %v", err)
	}
	if len(byTags) != 1 || byTags[0].ID != v.ID {
		s.t.Errorf("Volumes(tags %v) = %+v, want only %s", tags, byTags, v.ID)
	}
	byRun, err := s.st.Volumes(s.ctx, cloud.Filter{Tags: s.tags(nil)})
	if err != nil {
		s.t.Fatalf("Volumes(run tag): %v", err)
	}
	if got := volumeIDs(byRun); !slices.Equal(got, sorted(v.ID, other.ID)) {
		s.t.Errorf("Volumes(run tag) = %v, want %v", got, sorted(v.ID, other.ID))
	}

	in := s.launchInstance()
	const device = "/dev/sdf"
	if _, err := s.st.AttachVolume(s.ctx, v.ID, in.ID, device); err != nil {
		s.t.Fatalf("AttachVolume: %v", err)
	}
	att := s.waitVolume(v.ID, "attached", func(v cloud.Volume) bool {
		return v.State == cloud.VolumeInUse && v.AttachmentState == "attached"
	})
	if att.InstanceID != in.ID || att.Device != device {
		s.t.Errorf("attached volume = %+v, want instance %s device %s", att, in.ID, device)
	}
	if err := s.st.DeleteVolume(s.ctx, v.ID); err == nil {
		s.t.Errorf("DeleteVolume of an attached volume succeeded")
	}
	if _, err := s.st.AttachVolume(s.ctx, other.ID, in.ID, device); err == nil {
		s.t.Errorf("AttachVolume of a second volume as %s succeeded", device)
	}
	if _, err := s.st.AttachVolume(s.ctx, s.opts.UnknownVolumeID, in.ID, "/dev/sdg"); !errors.Is(err, cloud.ErrNotFound) {
		s.t.Errorf("AttachVolume(unknown volume): %v, want ErrNotFound", err)
	}

	if _, err := s.st.DetachVolume(s.ctx, v.ID, false); err != nil {
		s.t.Fatalf("DetachVolume: %v", err)
	}
	det := s.waitVolume(v.ID, "available after detaching", available)
	if det.InstanceID != "" || det.Device != "" {
		s.t.Errorf("detached volume = %+v, want no attachment", det)
	}

	if err := s.st.DeleteVolume(s.ctx, v.ID); err != nil {
		s.t.Fatalf("DeleteVolume: %v", err)
	}
	s.poll("volume "+v.ID+" gone", func() (bool, string) {
		got, listed := s.volume(s.st, v.ID)
		return !listed, fmt.Sprintf("%+v", got)
	})
	if err := s.st.DeleteVolume(s.ctx, s.opts.UnknownVolumeID); err != nil {
		s.t.Errorf("DeleteVolume(unknown): %v, want nil", err)
	}
}

func volumeIDs(vs []cloud.Volume) []string {
	out := make([]string, len(vs))
	for i, v := range vs {
		out[i] = v.ID
	}
	slices.Sort(out)
	return out
}

func sorted(s ...string) []string {
	slices.Sort(s)
	return s
}

// snapshot returns the snapshot with id as st lists it.
func (s *storageSuite) snapshot(st cloud.Storage, id string) (cloud.Snapshot, bool) {
	s.t.Helper()
	sns, err := st.Snapshots(s.ctx, cloud.Filter{IDs: []string{id}})
	if err != nil {
		s.t.Fatalf("Snapshots(%s): %v", id, err)
	}
	for _, sn := range sns {
		if sn.ID == id {
			return sn, true
		}
	}
	return cloud.Snapshot{}, false
}

func (s *storageSuite) waitSnapshotCompleted(st cloud.Storage, id string) cloud.Snapshot {
	s.t.Helper()
	var sn cloud.Snapshot
	s.poll("snapshot "+id+" completed", func() (bool, string) {
		var listed bool
		sn, listed = s.snapshot(st, id)
		if listed && sn.State == cloud.SnapshotError {
			s.t.Fatalf("snapshot %s failed: %+v", id, sn)
		}
		return listed && sn.State == cloud.SnapshotCompleted, fmt.Sprintf("%+v (listed %v)", sn, listed)
	})
	return sn
}

func (s *storageSuite) cleanupSnapshot(st cloud.Storage, id string) {
	s.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), s.opts.Wait)
		defer cancel()
		if err := st.DeleteSnapshot(ctx, id); err != nil {
			s.t.Errorf("cleanup: DeleteSnapshot(%s): %v", id, err)
		}
	})
}

// createSnapshot snapshots a new volume of sizeGB and waits until the
// snapshot is completed.
func (s *storageSuite) createSnapshot(sizeGB int, tags map[string]string) (cloud.Volume, cloud.Snapshot) {
	s.t.Helper()
	v := s.createVolume(cloud.VolumeSpec{Zone: s.opts.Zone, SizeGB: sizeGB, Tags: s.tags(nil)})
	desc := "cloudtest " + s.run
	sn, err := s.st.CreateSnapshot(s.ctx, v.ID, desc, tags)
	if err != nil {
		s.t.Fatalf("CreateSnapshot(%s): %v", v.ID, err)
	}
	s.cleanupSnapshot(s.st, sn.ID)
	sn = s.waitSnapshotCompleted(s.st, sn.ID)
	if sn.SizeGB != sizeGB || sn.VolumeID != v.ID || sn.Description != desc || !maps.Equal(sn.Tags, tags) {
		s.t.Errorf("snapshot = %+v, want %d GiB of %s described %q tagged %v", sn, sizeGB, v.ID, desc, tags)
	}
	return v, sn
}

func (s *storageSuite) snapshots() {
	tags := s.tags(map[string]string{"cloudtest:kind": "snapshot"})
	_, sn := s.createSnapshot(2, tags)

	byTags, err := s.st.Snapshots(s.ctx, cloud.Filter{Tags: tags})
	if err != nil {
		s.t.Fatalf("Snapshots(tags): %v", err)
	}
	if len(byTags) != 1 || byTags[0].ID != sn.ID {
		s.t.Errorf("Snapshots(tags %v) = %+v, want only %s", tags, byTags, sn.ID)
	}

	for _, tc := range []struct {
		ask, want int
	}{{0, 2}, {3, 3}} {
		v := s.createVolume(cloud.VolumeSpec{Zone: s.opts.Zone, SizeGB: tc.ask, SnapshotID: sn.ID, Tags: s.tags(nil)})
		if v.SizeGB != tc.want || v.SnapshotID != sn.ID {
			s.t.Errorf("volume of %d GiB from a %d GiB snapshot = %+v, want %d GiB from %s", tc.ask, sn.SizeGB, v, tc.want, sn.ID)
		}
	}
	small, err := s.st.CreateVolume(s.ctx, cloud.VolumeSpec{Zone: s.opts.Zone, SizeGB: 1, SnapshotID: sn.ID, Tags: s.tags(nil)})
	if err == nil {
		s.cleanupVolume(small.ID)
		s.t.Errorf("CreateVolume of 1 GiB from a 2 GiB snapshot succeeded: %+v", small)
	}

	if err := s.st.DeleteSnapshot(s.ctx, sn.ID); err != nil {
		s.t.Fatalf("DeleteSnapshot: %v", err)
	}
	s.poll("snapshot "+sn.ID+" gone", func() (bool, string) {
		got, listed := s.snapshot(s.st, sn.ID)
		return !listed, fmt.Sprintf("%+v", got)
	})
	if err := s.st.DeleteSnapshot(s.ctx, sn.ID); err != nil {
		s.t.Errorf("DeleteSnapshot of a deleted snapshot: %v, want nil", err)
	}
}

func (s *storageSuite) copySnapshot() {
	if s.opts.OtherRegion == nil {
		s.t.Skip("no other region given")
	}
	other := s.opts.OtherRegion(s.t)
	if other.Region() == s.st.Region() {
		s.t.Fatalf("OtherRegion is the provider's own region %s", other.Region())
	}
	_, sn := s.createSnapshot(1, s.tags(nil))
	tags := s.tags(map[string]string{"cloudtest:kind": "copy"})
	cp, err := other.CopySnapshot(s.ctx, s.st.Region(), sn.ID, "cloudtest copy "+s.run, tags)
	if err != nil {
		s.t.Fatalf("CopySnapshot from %s to %s: %v", s.st.Region(), other.Region(), err)
	}
	s.cleanupSnapshot(other, cp.ID)
	if cp.ID == "" || cp.ID == sn.ID {
		s.t.Fatalf("CopySnapshot returned id %q for a copy of %s", cp.ID, sn.ID)
	}
	got := s.waitSnapshotCompleted(other, cp.ID)
	if got.SizeGB != sn.SizeGB || !maps.Equal(got.Tags, tags) {
		s.t.Errorf("copied snapshot = %+v, want %d GiB tagged %v", got, sn.SizeGB, tags)
	}
	byTags, err := other.Snapshots(s.ctx, cloud.Filter{Tags: tags})
	if err != nil {
		s.t.Fatalf("Snapshots in %s: %v", other.Region(), err)
	}
	if len(byTags) != 1 || byTags[0].ID != cp.ID {
		s.t.Errorf("Snapshots(tags) in %s = %+v, want only %s", other.Region(), byTags, cp.ID)
	}
	// The original stays where it was.
	if _, listed := s.snapshot(s.st, sn.ID); !listed {
		s.t.Errorf("source snapshot %s is gone from %s after the copy", sn.ID, s.st.Region())
	}
}

// image returns the image with id as listed.
func (s *storageSuite) image(id string) (cloud.Image, bool) {
	s.t.Helper()
	imgs, err := s.st.Images(s.ctx, cloud.Filter{IDs: []string{id}})
	if err != nil {
		s.t.Fatalf("Images(%s): %v", id, err)
	}
	for _, img := range imgs {
		if img.ID == id {
			return img, true
		}
	}
	return cloud.Image{}, false
}

func (s *storageSuite) images() {
	_, sn := s.createSnapshot(1, s.tags(nil))
	tags := s.tags(map[string]string{"cloudtest:kind": "image"})
	spec := cloud.ImageSpec{
		Name:        "cloudtest-" + s.run,
		Description: "cloudtest image",
		RootDevice:  "/dev/xvda",
		Devices:     []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: sn.ID}},
		Tags:        tags,
	}
	img, err := s.st.RegisterImage(s.ctx, spec)
	if err != nil {
		s.t.Fatalf("RegisterImage: %v", err)
	}
	s.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), s.opts.Wait)
		defer cancel()
		if err := s.st.DeregisterImage(ctx, img.ID); err != nil {
			s.t.Errorf("cleanup: DeregisterImage(%s): %v", img.ID, err)
		}
	})
	s.poll("image "+img.ID+" available", func() (bool, string) {
		var listed bool
		img, listed = s.image(img.ID)
		return listed && img.State == cloud.ImageAvailable, fmt.Sprintf("%+v (listed %v)", img, listed)
	})
	if img.Name != spec.Name || img.RootDevice != "/dev/xvda" || len(img.Devices) != 1 ||
		img.Devices[0].SnapshotID != sn.ID || !maps.Equal(img.Tags, tags) {
		s.t.Errorf("registered image = %+v, want %q with root /dev/xvda from %s tagged %v", img, spec.Name, sn.ID, tags)
	}
	byTags, err := s.st.Images(s.ctx, cloud.Filter{Tags: tags})
	if err != nil {
		s.t.Fatalf("Images(tags): %v", err)
	}
	if len(byTags) != 1 || byTags[0].ID != img.ID {
		s.t.Errorf("Images(tags %v) = %+v, want only %s", tags, byTags, img.ID)
	}

	dup := spec
	dup.Tags = s.tags(nil)
	if again, err := s.st.RegisterImage(s.ctx, dup); err == nil {
		_ = s.st.DeregisterImage(s.ctx, again.ID)
		s.t.Errorf("RegisterImage with the taken name %q succeeded: %s", spec.Name, again.ID)
	}
	bad := cloud.ImageSpec{
		Name:    "cloudtest-bad-" + s.run,
		Devices: []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: "snap-0000000000000000f"}},
	}
	if again, err := s.st.RegisterImage(s.ctx, bad); err == nil {
		_ = s.st.DeregisterImage(s.ctx, again.ID)
		s.t.Errorf("RegisterImage of an unknown snapshot succeeded: %s", again.ID)
	}

	if err := s.st.DeregisterImage(s.ctx, img.ID); err != nil {
		s.t.Fatalf("DeregisterImage: %v", err)
	}
	s.poll("image "+img.ID+" gone", func() (bool, string) {
		got, listed := s.image(img.ID)
		return !listed, fmt.Sprintf("%+v", got)
	})
	if _, listed := s.snapshot(s.st, sn.ID); !listed {
		s.t.Errorf("DeregisterImage removed snapshot %s too", sn.ID)
	}
	if err := s.st.DeregisterImage(s.ctx, img.ID); err != nil {
		s.t.Errorf("DeregisterImage of a deregistered image: %v, want nil", err)
	}
}
