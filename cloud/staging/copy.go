package staging

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// TagCopiedFrom marks a copy with "region/id" of its original.
const TagCopiedFrom = "hangar:copied-from"

func (m *Manager) InRegion(ctx context.Context, region string) (*Manager, error) {
	if region == m.Region() {
		return nil, fmt.Errorf("copying to %s: that is the source region", region)
	}
	if m.opts.OtherRegion == nil {
		return nil, fmt.Errorf("copying to %s: this provider cannot open another region", region)
	}
	dst, err := m.opts.OtherRegion(ctx, region)
	if err != nil {
		return nil, fmt.Errorf("opening region %s: %w", region, err)
	}
	return dst, nil
}

func (m *Manager) snapshot(ctx context.Context, id string) (cloud.Snapshot, error) {
	ss, err := m.storage.Snapshots(ctx, cloud.Filter{IDs: []string{id}})
	if err != nil {
		return cloud.Snapshot{}, fmt.Errorf("looking up snapshot %s: %w", id, err)
	}
	if len(ss) == 0 {
		return cloud.Snapshot{}, fmt.Errorf("snapshot %s in %s: %w", id, m.Region(), cloud.ErrNotFound)
	}
	return ss[0], nil
}

// CopySnapshot copies a snapshot into the manager dst's region with the
// cloud's copy call, or, on a cloud without one, through staging servers
// in both regions. It waits until the copy is complete; a failed copy is
// deleted. The copy keeps the original's tags, so a staging volume of the
// same name in the destination starts from it.
func (m *Manager) CopySnapshot(ctx context.Context, id string, dst *Manager) (cloud.Snapshot, error) {
	src, err := m.snapshot(ctx, id)
	if err != nil {
		return cloud.Snapshot{}, err
	}
	desc := firstNonEmpty(src.Description, "Copy of "+id)
	tags := copyTags(src.Tags, m.Region()+"/"+id)
	_, _ = fmt.Fprintf(m.out, "copying snapshot %s from %s to %s\n", id, m.Region(), dst.Region())
	snap, err := dst.storage.CopySnapshot(ctx, m.Region(), id, desc, tags)
	if errors.Is(err, cloud.ErrNotSupported) {
		return m.copySnapshotViaServers(ctx, src, dst)
	}
	if err != nil {
		return cloud.Snapshot{}, fmt.Errorf("copying snapshot %s to %s: %w", id, dst.Region(), err)
	}
	done, err := dst.waitSnapshot(ctx, snap.ID)
	if err != nil {
		dst.discard(ctx, nil, []string{snap.ID}, nil)
		return cloud.Snapshot{}, fmt.Errorf("copying snapshot %s to %s: %w", id, dst.Region(), err)
	}
	return done, nil
}

func copyTags(tags map[string]string, from string) map[string]string {
	out := maps.Clone(tags)
	if out == nil {
		out = map[string]string{}
	}
	out[TagCopiedFrom] = from
	return out
}

// copySnapshotViaServers is the Perl manager's way: a volume made from the
// snapshot on a staging server here, a blank one on a server there, the
// data copied between the two servers directly (rsync for filesystems,
// dd for anything else), and a snapshot of the copy. Both volumes are
// deleted afterwards, whatever happens.
func (m *Manager) copySnapshotViaServers(ctx context.Context, src cloud.Snapshot, dst *Manager) (_ cloud.Snapshot, err error) {
	fail := func(err error) (cloud.Snapshot, error) {
		return cloud.Snapshot{}, fmt.Errorf("copying snapshot %s to %s through staging servers: %w", src.ID, dst.Region(), err)
	}
	name := "copy-" + strings.ToLower(src.ID)
	// Unknown contents (an image's partitioned disk) are copied block by block.
	fstype := src.Tags[TagFSType]
	if fstype == "" {
		fstype = "raw"
	}
	spec := VolumeSpec{Name: name, SnapshotID: src.ID, FSType: fstype, NoReuse: true}
	from, fromSrv, err := m.ProvisionVolume(ctx, spec)
	if from != nil {
		defer m.discard(ctx, from, nil, nil)
	}
	if err != nil {
		return fail(err)
	}
	to, toSrv, err := dst.ProvisionVolume(ctx, VolumeSpec{Name: name, SizeGB: max(src.SizeGB, from.Cloud.SizeGB), FSType: fstype, NoReuse: true})
	if to != nil {
		defer dst.discard(ctx, to, nil, nil)
	}
	if err != nil {
		return fail(err)
	}
	c, err := fromSrv.Client(ctx)
	if err != nil {
		return fail(err)
	}
	if from.MountPath != "" && to.MountPath != "" {
		// The hop logs into the destination region's server, with that
		// region's key.
		keys, err := dst.kh.pinnedKeys(withPort(toSrv.Instance.ID))
		if err != nil {
			return fail(err)
		}
		opts := RsyncOptions{Progress: m.opts.Progress, LiveProgress: m.opts.LiveProgress, Extra: []string{"-H"}}
		if err := RemoteRsync(ctx, c, m.opts.Sudo, []string{from.MountPath + "/"}, toSrv.Endpoint(), to.MountPath+"/", keys, dst.signer, opts); err != nil {
			return fail(err)
		}
	} else {
		dc, err := toSrv.Client(ctx)
		if err != nil {
			return fail(err)
		}
		if _, err := BlockCopy(ctx, c, from.Device, m.opts.Sudo, dc, to.Device, dst.opts.Sudo, m.liveProgress()); err != nil {
			return fail(err)
		}
	}
	if err := dst.Detach(ctx, to); err != nil {
		return fail(err)
	}
	snap, err := dst.storage.CreateSnapshot(ctx, to.Cloud.ID, firstNonEmpty(src.Description, "Copy of "+src.ID), copyTags(src.Tags, m.Region()+"/"+src.ID))
	if err != nil {
		return fail(err)
	}
	done, err := dst.waitSnapshot(ctx, snap.ID)
	if err != nil {
		dst.discard(ctx, nil, []string{snap.ID}, nil)
		return fail(err)
	}
	return done, nil
}

// discard deletes what a failed or finished copy leaves behind, on its own
// time: the caller's ctx may be what ended.
func (m *Manager) discard(ctx context.Context, v *Volume, snaps, images []string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Minute)
	defer cancel()
	for _, id := range images {
		if err := m.storage.DeregisterImage(ctx, id); err != nil {
			m.log.Warn("removing a copy's image", "image", id, "err", err)
		}
	}
	for _, id := range snaps {
		if err := m.storage.DeleteSnapshot(ctx, id); err != nil {
			m.log.Warn("removing a copy's snapshot", "snapshot", id, "err", err)
		}
	}
	if v != nil {
		if err := m.Detach(ctx, v); err != nil {
			m.log.Warn("detaching a copy's volume", "volume", v.Cloud.ID, "err", err)
		}
		if err := m.storage.DeleteVolume(ctx, v.Cloud.ID); err != nil {
			m.log.Warn("deleting a copy's volume", "volume", v.Cloud.ID, "err", err)
		}
	}
}

// CopyImage copies an image into dst's region: with the cloud's copy call
// when it has one, else by copying each of its snapshots (see
// CopySnapshot) and registering the copies there. It waits until the new
// image is available; on failure, what the copy made is removed.
func (m *Manager) CopyImage(ctx context.Context, id string, dst *Manager) (cloud.Image, error) {
	imgs, err := m.storage.Images(ctx, cloud.Filter{IDs: []string{id}})
	if err != nil {
		return cloud.Image{}, fmt.Errorf("looking up image %s: %w", id, err)
	}
	if len(imgs) == 0 {
		return cloud.Image{}, fmt.Errorf("image %s in %s: %w", id, m.Region(), cloud.ErrNotFound)
	}
	img := imgs[0]
	fail := func(err error) (cloud.Image, error) {
		return cloud.Image{}, fmt.Errorf("copying image %s to %s: %w", id, dst.Region(), err)
	}
	spec := cloud.ImageSpec{
		Name:         img.Name,
		Description:  firstNonEmpty(img.Description, "Copy of "+id+" from "+m.Region()),
		Architecture: img.Architecture,
		RootDevice:   img.RootDevice,
		Tags:         copyTags(img.Tags, m.Region()+"/"+id),
		ClientToken:  "copy-" + id + "-" + newName("t"),
	}
	_, _ = fmt.Fprintf(m.out, "copying image %s (%s) from %s to %s\n", id, img.Name, m.Region(), dst.Region())
	out, err := dst.storage.CopyImage(ctx, m.Region(), id, spec)
	var made []string
	if errors.Is(err, cloud.ErrNotSupported) {
		for _, d := range img.Devices {
			if d.SnapshotID == "" {
				spec.Devices = append(spec.Devices, d)
				continue
			}
			// The cloud's snapshot copy where it has one (the local
			// cloud's, whose image disks are directories that a block
			// copy cannot read), staging servers otherwise.
			cp, err := m.CopySnapshot(ctx, d.SnapshotID, dst)
			if err != nil {
				dst.discard(ctx, nil, made, nil)
				return fail(err)
			}
			made = append(made, cp.ID)
			spec.Devices = append(spec.Devices, cloud.BlockDevice{Device: d.Device, SnapshotID: cp.ID, SizeGB: d.SizeGB})
		}
		out, err = dst.storage.RegisterImage(ctx, spec)
	}
	if err != nil {
		dst.discard(ctx, nil, made, nil)
		return fail(err)
	}
	err = dst.waitFor(ctx, "image "+out.ID, 24*time.Hour, func(ctx context.Context) (bool, error) {
		imgs, err := dst.storage.Images(ctx, cloud.Filter{IDs: []string{out.ID}})
		if err != nil || len(imgs) == 0 {
			return false, err
		}
		out = imgs[0]
		if out.State == cloud.ImageFailed {
			return false, fmt.Errorf("image %s failed", out.ID)
		}
		return out.State == cloud.ImageAvailable, nil
	})
	if err != nil {
		// A cloud-side copy made its own snapshots: remove them with it.
		for _, d := range out.Devices {
			if d.SnapshotID != "" && !slices.Contains(made, d.SnapshotID) {
				made = append(made, d.SnapshotID)
			}
		}
		dst.discard(ctx, nil, made, []string{out.ID})
		return fail(err)
	}
	return out, nil
}
