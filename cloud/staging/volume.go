package staging

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/internal/shell"
)

// FSTypes are the filesystems a staging volume can be made with; "raw" is
// attached and never formatted or mounted.
var FSTypes = []string{"ext4", "ext3", "ext2", "xfs", "raw"}

// VolumeSpec says what volume ProvisionVolume makes.
type VolumeSpec struct {
	Name   string // "" = a random "volume-…" name
	SizeGB int    // 0 only with a snapshot: its size
	FSType string // default ext4
	Zone   string // "" = where a staging server is, else the manager's zone
	Mount  string // default /mnt/Staging/<name>
	Label  string
	// VolumeID adopts an existing volume; SnapshotID starts from a snapshot.
	VolumeID   string
	SnapshotID string
	// NoReuse: do not start from the newest snapshot of a volume of the
	// same name (the Perl manager's -reuse => 0).
	NoReuse bool
}

// Volume is a staging volume: a cloud volume with a name, a filesystem and
// a mount point on the server it is attached to.
type Volume struct {
	Name   string       `json:"name"`
	FSType string       `json:"fs_type"`
	Mount  string       `json:"mount,omitempty"`
	Label  string       `json:"label,omitempty"`
	Cloud  cloud.Volume `json:"cloud"`

	// Where it is on its server once mounted, as ssh sees that machine:
	// the block device (or the local cloud's file or directory) and the
	// mount point ("" for raw volumes).
	Device    string `json:"device,omitempty"`
	MountPath string `json:"mount_path,omitempty"`
	// Directory: the cloud's volumes are plain directories (the local
	// cloud's, but for raw ones), with no blocks to copy.
	Directory bool `json:"directory,omitempty"`
}

func volumeFrom(v cloud.Volume) *Volume {
	return &Volume{
		Name:   v.Tags[TagName],
		FSType: v.Tags[TagFSType],
		Mount:  v.Tags[TagMount],
		Label:  v.Tags[TagLabel],
		Cloud:  v,
	}
}

// Volumes returns the staging volumes in the region, by name.
func (m *Manager) Volumes(ctx context.Context) ([]*Volume, error) {
	vs, err := m.storage.Volumes(ctx, cloud.Filter{Tags: map[string]string{TagRole: "volume"}})
	if err != nil {
		return nil, fmt.Errorf("listing staging volumes: %w", err)
	}
	out := make([]*Volume, 0, len(vs))
	for _, v := range vs {
		out = append(out, volumeFrom(v))
	}
	slices.SortFunc(out, func(a, b *Volume) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// FindVolume returns the volume called name (or with that volume id); the
// error matches cloud.ErrNotFound when there is none.
func (m *Manager) FindVolume(ctx context.Context, name string) (*Volume, error) {
	vs, err := m.Volumes(ctx)
	if err != nil {
		return nil, err
	}
	for _, v := range vs {
		if v.Name == name || v.Cloud.ID == name {
			return v, nil
		}
	}
	return nil, fmt.Errorf("staging volume %s: %w", name, cloud.ErrNotFound)
}

// GetVolume returns the volume called spec.Name, attached and mounted, or
// provisions it.
func (m *Manager) GetVolume(ctx context.Context, spec VolumeSpec) (*Volume, *Server, error) {
	if spec.Name != "" {
		v, err := m.FindVolume(ctx, spec.Name)
		if err == nil {
			srv, err := m.Mount(ctx, v)
			return v, srv, err
		}
		if !errors.Is(err, cloud.ErrNotFound) {
			return nil, nil, err
		}
	}
	return m.ProvisionVolume(ctx, spec)
}

// ProvisionVolume creates a volume, attaches it to a staging server in its
// zone (launching one if needed), formats it if it is new, and mounts it.
// A named volume starts from the newest snapshot of a volume of that name
// unless spec.NoReuse; asking for more than the snapshot's size grows it.
func (m *Manager) ProvisionVolume(ctx context.Context, spec VolumeSpec) (*Volume, *Server, error) {
	if spec.Name == "" {
		spec.Name = newName("volume")
	}
	fail := func(err error) (*Volume, *Server, error) {
		return nil, nil, fmt.Errorf("provisioning staging volume %s: %w", spec.Name, err)
	}
	if err := checkVolumeSpec(&spec); err != nil {
		return fail(err)
	}
	if _, err := m.FindVolume(ctx, spec.Name); err == nil {
		return fail(errors.New("a volume of that name exists"))
	} else if !errors.Is(err, cloud.ErrNotFound) {
		return fail(err)
	}

	tags := map[string]string{TagRole: "volume", TagName: spec.Name, TagFSType: spec.FSType, TagMount: spec.Mount}
	if spec.Label != "" {
		tags[TagLabel] = spec.Label
	}
	if spec.VolumeID != "" {
		return m.adoptVolume(ctx, spec, tags)
	}
	if spec.SnapshotID == "" && !spec.NoReuse {
		snap, err := m.latestSnapshot(ctx, spec.Name)
		if err != nil {
			return fail(err)
		}
		if snap != nil {
			_, _ = fmt.Fprintf(m.out, "volume %s starts from its newest snapshot %s (%s)\n", spec.Name, snap.ID, snap.StartedAt.Format(time.RFC3339))
			spec.SnapshotID = snap.ID
		}
	}
	if spec.SnapshotID != "" {
		snaps, err := m.storage.Snapshots(ctx, cloud.Filter{IDs: []string{spec.SnapshotID}})
		if err != nil {
			return fail(err)
		}
		if len(snaps) == 0 {
			return fail(fmt.Errorf("snapshot %s: %w", spec.SnapshotID, cloud.ErrNotFound))
		}
		// A snapshot of a staging volume knows its filesystem.
		if t := snaps[0].Tags[TagFSType]; t != "" && spec.FSType == "" {
			spec.FSType = t
		}
		if spec.SizeGB != 0 && spec.SizeGB < snaps[0].SizeGB {
			return fail(fmt.Errorf("%d GB is less than the %d GB of snapshot %s; volumes cannot shrink", spec.SizeGB, snaps[0].SizeGB, spec.SnapshotID))
		}
	} else if spec.SizeGB <= 0 {
		return fail(errors.New("size must be a positive number of GB"))
	}
	if spec.FSType == "" {
		spec.FSType = "ext4"
	}
	tags[TagFSType] = spec.FSType

	// The volume goes where its server is: an existing server's zone, or
	// the zone a new server lands in.
	srv, err := m.ServerInZone(ctx, spec.Zone)
	if err != nil {
		return fail(err)
	}
	vol, err := m.storage.CreateVolume(ctx, cloud.VolumeSpec{
		Zone:        srv.Instance.Zone,
		SizeGB:      spec.SizeGB,
		SnapshotID:  spec.SnapshotID,
		Raw:         spec.FSType == "raw",
		Tags:        tags,
		ClientToken: "staging-" + spec.Name + "-" + newName("t"),
	})
	if err != nil {
		return fail(err)
	}
	m.log.Info("created staging volume", "name", spec.Name, "id", vol.ID, "size_gb", vol.SizeGB, "snapshot", spec.SnapshotID)
	v := volumeFrom(vol)
	err = m.attach(ctx, v, srv)
	if err == nil {
		err = m.mountOn(ctx, v, srv, spec.SnapshotID == "")
	}
	if err != nil {
		// Half made: it would hold the name and block the next try.
		m.discard(ctx, v, nil, nil)
		return fail(err)
	}
	return v, srv, nil
}

// adoptVolume puts an existing volume under the manager by tagging it.
// Its filesystem must exist already: adopting never formats.
func (m *Manager) adoptVolume(ctx context.Context, spec VolumeSpec, tags map[string]string) (*Volume, *Server, error) {
	fail := func(err error) (*Volume, *Server, error) {
		return nil, nil, fmt.Errorf("adopting volume %s as %s: %w", spec.VolumeID, spec.Name, err)
	}
	vs, err := m.storage.Volumes(ctx, cloud.Filter{IDs: []string{spec.VolumeID}})
	if err != nil {
		return fail(err)
	}
	if len(vs) == 0 {
		return fail(cloud.ErrNotFound)
	}
	if r := vs[0].Tags[TagRole]; r != "" {
		return fail(fmt.Errorf("it is already a staging %s (%s)", r, vs[0].Tags[TagName]))
	}
	if vs[0].InstanceID != "" && m.FindServerByInstance(vs[0].InstanceID) == nil {
		return fail(fmt.Errorf("it is attached to %s, which is not a staging server; detach it first", vs[0].InstanceID))
	}
	if spec.FSType == "" {
		spec.FSType = "ext4"
	}
	tags[TagFSType] = spec.FSType
	if err := m.storage.Tag(ctx, spec.VolumeID, tags); err != nil {
		return fail(err)
	}
	vs[0].Tags = tags
	v := volumeFrom(vs[0])
	srv, err := m.Mount(ctx, v)
	return v, srv, err
}

func checkVolumeSpec(spec *VolumeSpec) error {
	var errs []error
	if err := shell.ValidName(spec.Name); err != nil {
		errs = append(errs, err)
	}
	if spec.FSType != "" && !slices.Contains(FSTypes, spec.FSType) {
		errs = append(errs, fmt.Errorf("fstype %q is not one of %s", spec.FSType, strings.Join(FSTypes, ", ")))
	}
	if spec.Mount == "" {
		spec.Mount = "/mnt/Staging/" + spec.Name
	}
	if !path.IsAbs(spec.Mount) || path.Clean(spec.Mount) != spec.Mount || spec.Mount == "/" {
		errs = append(errs, fmt.Errorf("mount point %q must be a clean absolute path other than /", spec.Mount))
	}
	if spec.SizeGB < 0 {
		errs = append(errs, fmt.Errorf("size %d GB is negative", spec.SizeGB))
	}
	if strings.ContainsAny(spec.Label, "\n\x00") || len(spec.Label) > 12 {
		errs = append(errs, fmt.Errorf("label %q: at most 12 characters on one line (ext's limit)", spec.Label))
	}
	return errors.Join(errs...)
}

// latestSnapshot is the newest completed snapshot of a volume called name.
func (m *Manager) latestSnapshot(ctx context.Context, name string) (*cloud.Snapshot, error) {
	snaps, err := m.storage.Snapshots(ctx, cloud.Filter{Tags: map[string]string{TagRole: "snapshot", TagName: name}})
	if err != nil {
		return nil, fmt.Errorf("looking for snapshots of %s: %w", name, err)
	}
	var best *cloud.Snapshot
	for i, s := range snaps {
		if s.State != cloud.SnapshotCompleted {
			continue
		}
		if best == nil || s.StartedAt.After(best.StartedAt) {
			best = &snaps[i]
		}
	}
	return best, nil
}

// Mount makes sure v is attached to a running staging server in its zone
// and mounted there, and returns the server.
func (m *Manager) Mount(ctx context.Context, v *Volume) (*Server, error) {
	var srv *Server
	if v.Cloud.InstanceID != "" {
		srv = m.FindServerByInstance(v.Cloud.InstanceID)
		if srv == nil {
			// Launched by another process since this one's scan?
			if err := m.Scan(ctx); err != nil {
				return nil, err
			}
			srv = m.FindServerByInstance(v.Cloud.InstanceID)
		}
		if srv == nil {
			return nil, fmt.Errorf("volume %s is attached to %s, which is not a staging server of this key; detach it first", v.Name, v.Cloud.InstanceID)
		}
		if _, err := srv.Client(ctx); err != nil {
			return nil, err
		}
	} else {
		var err error
		if srv, err = m.ServerInZone(ctx, v.Cloud.Zone); err != nil {
			return nil, err
		}
		if err := m.attach(ctx, v, srv); err != nil {
			return nil, err
		}
	}
	if err := m.mountOn(ctx, v, srv, false); err != nil {
		return nil, err
	}
	return srv, nil
}

// attach attaches v to srv at the first free device and waits until the
// cloud says it is attached.
func (m *Manager) attach(ctx context.Context, v *Volume, srv *Server) error {
	vs, err := m.storage.Volumes(ctx, cloud.Filter{Tags: map[string]string{TagRole: "volume"}})
	if err != nil {
		return fmt.Errorf("attaching %s: %w", v.Name, err)
	}
	used := map[string]bool{}
	for _, o := range vs {
		if o.InstanceID == srv.Instance.ID {
			used[o.Device] = true
		}
	}
	device := ""
	for c := 'f'; c <= 'p'; c++ {
		if d := "/dev/sd" + string(c); !used[d] {
			device = d
			break
		}
	}
	if device == "" {
		return fmt.Errorf("attaching %s: server %s has no free device", v.Name, srv.Name)
	}
	what := fmt.Sprintf("volume %s (%s) to be available", v.Name, v.Cloud.ID)
	if err := m.waitVolume(ctx, v, what, func(cv cloud.Volume) bool { return cv.State == cloud.VolumeAvailable }); err != nil {
		return err
	}
	if _, err := m.storage.AttachVolume(ctx, v.Cloud.ID, srv.Instance.ID, device); err != nil {
		return fmt.Errorf("attaching %s to %s: %w", v.Name, srv.Name, err)
	}
	what = fmt.Sprintf("volume %s to attach to %s as %s", v.Name, srv.Name, device)
	return m.waitVolume(ctx, v, what, func(cv cloud.Volume) bool {
		return cv.InstanceID == srv.Instance.ID && cv.AttachmentState == "attached"
	})
}

// waitVolume polls v until ok says so, updating v.Cloud.
func (m *Manager) waitVolume(ctx context.Context, v *Volume, what string, ok func(cloud.Volume) bool) error {
	return m.waitFor(ctx, what, m.opts.ReadyTimeout, func(ctx context.Context) (bool, error) {
		vs, err := m.storage.Volumes(ctx, cloud.Filter{IDs: []string{v.Cloud.ID}})
		if err != nil {
			return false, err
		}
		if len(vs) == 0 {
			return false, fmt.Errorf("volume %s: %w", v.Cloud.ID, cloud.ErrNotFound)
		}
		v.Cloud = vs[0]
		if vs[0].State == cloud.VolumeError {
			return false, fmt.Errorf("volume %s is in state error", v.Cloud.ID)
		}
		return ok(vs[0]), nil
	})
}

// mountScript finds an attached volume's device on the server, makes its
// filesystem if it has none, mounts it (growing the filesystem to the
// volume) and prints "device=…" and "mount=…". The kernel names EC2's
// /dev/sdf /dev/xvdf, or an NVMe device whose serial is the volume id; the
// local cloud links its volumes under $root/dev, and a directory volume is
// "mounted" by a link. Values arrive as variables set by shell.Quote.
const mountScript = `
set -eu
find_dev() {
	for d in "$root/dev/${dev#/dev/}" "$dev" "/dev/xvd${dev#/dev/sd}"; do
		[ -e "$d" ] && { readlink -f "$d"; return 0; }
	done
	for d in /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_$(echo "$vol" | tr -d -)*; do
		[ -e "$d" ] && { readlink -f "$d"; return 0; }
	done
	return 1
}
i=0
until d=$(find_dev); do
	i=$((i + 1))
	[ $i -lt 240 ] || { echo "device $dev of volume $vol did not appear" >&2; exit 1; }
	sleep 0.5
done
echo "device=$d"
mnt=$root$mount
if [ -d "$d" ]; then
	mkdir -p "$(dirname "$mnt")"
	if [ -L "$mnt" ] || [ ! -e "$mnt" ]; then
		ln -sfn "$d" "$mnt.hangar-link" && mv -Tf "$mnt.hangar-link" "$mnt"
	elif [ "$(readlink -f "$mnt")" != "$d" ]; then
		echo "mount point $mount is in use" >&2; exit 1
	fi
	echo "mount=$mnt"
	echo "directory=yes"
	exit 0
fi
[ "$fstype" = raw ] && exit 0
# Only a volume this manager has just created blank is ever formatted; any
# other without a filesystem (or that blkid cannot read) is refused.
rc=0
blkid -p "$d" >/dev/null 2>&1 || rc=$?
if [ "$fresh" = yes ] && [ $rc -eq 2 ]; then
	case "$fstype" in
	xfs) mkfs.xfs -q ${label:+-L "$label"} "$d" ;;
	*) mkfs -t "$fstype" -q ${label:+-L "$label"} "$d" ;;
	esac
elif [ $rc -eq 2 ]; then
	echo "volume $vol ($d) has no filesystem; not formatting a volume that was not created blank" >&2
	exit 1
elif [ $rc -ne 0 ]; then
	echo "blkid cannot read $d (status $rc)" >&2
	exit 1
fi
mkdir -p "$mnt"
if mountpoint -q "$mnt"; then
	src=$(findmnt -rno SOURCE --mountpoint "$mnt")
	if [ "$(readlink -f "$src")" != "$d" ]; then
		echo "$mount has $src mounted, not $d" >&2
		exit 1
	fi
else
	mount "$d" "$mnt"
fi
case "$fstype" in
ext*) resize2fs "$d" >/dev/null ;;
xfs) xfs_growfs "$mnt" >/dev/null ;;
esac
echo "mount=$mnt"
`

// unmountScript undoes mountScript's mount (not the attachment).
const unmountScript = `
set -eu
mnt=$root$mount
if [ -L "$mnt" ]; then
	rm -f "$mnt"
elif mountpoint -q "$mnt" 2>/dev/null; then
	sync
	umount "$mnt"
fi
`

// shellVars renders name=value lines, every value through shell.Quote.
func shellVars(kv ...string) string {
	var b strings.Builder
	for i := 0; i+1 < len(kv); i += 2 {
		fmt.Fprintf(&b, "%s=%s\n", kv[i], shell.Quote(kv[i+1]))
	}
	return b.String()
}

// mountOn runs mountScript for v on srv and records where it is. fresh
// allows making a filesystem: the volume was just created blank.
func (m *Manager) mountOn(ctx context.Context, v *Volume, srv *Server, fresh bool) error {
	if v.Cloud.Device == "" {
		return fmt.Errorf("mounting volume %s on %s: the cloud reports no device for it", v.Name, srv.Name)
	}
	yes := map[bool]string{true: "yes", false: "no"}[fresh]
	script := shellVars("root", srv.root, "dev", v.Cloud.Device, "vol", v.Cloud.ID,
		"fstype", v.FSType, "mount", v.Mount, "label", v.Label, "fresh", yes) + mountScript
	out, err := srvOutput(ctx, srv, srv.privileged(script))
	if err != nil {
		return fmt.Errorf("mounting volume %s on %s: %w", v.Name, srv.Name, err)
	}
	info := parseKV(out)
	v.Device, v.MountPath, v.Directory = info["device"], info["mount"], info["directory"] == "yes"
	if v.Device == "" || v.FSType != "raw" && v.MountPath == "" {
		return fmt.Errorf("mounting volume %s on %s: the script did not say where", v.Name, srv.Name)
	}
	return nil
}

// unmount unmounts v on srv, if srv runs.
func (m *Manager) unmount(ctx context.Context, v *Volume, srv *Server) error {
	if v.FSType == "raw" {
		return nil
	}
	script := shellVars("root", srv.root, "mount", v.Mount) + unmountScript
	if _, err := srvOutput(ctx, srv, srv.privileged(script)); err != nil {
		return fmt.Errorf("unmounting volume %s on %s: %w", v.Name, srv.Name, err)
	}
	return nil
}

func srvOutput(ctx context.Context, srv *Server, cmd string) ([]byte, error) {
	c, err := srv.Client(ctx)
	if err != nil {
		return nil, err
	}
	return c.Output(ctx, cmd)
}

func parseKV(out []byte) map[string]string {
	kv := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			kv[k] = v
		}
	}
	return kv
}

// Detach unmounts v and detaches it from its server.
func (m *Manager) Detach(ctx context.Context, v *Volume) error {
	if v.Cloud.InstanceID == "" {
		return nil
	}
	if srv := m.FindServerByInstance(v.Cloud.InstanceID); srv != nil && srv.Instance.State == cloud.StateRunning {
		if err := m.unmount(ctx, v, srv); err != nil {
			return err
		}
	}
	if _, err := m.storage.DetachVolume(ctx, v.Cloud.ID, false); err != nil {
		return fmt.Errorf("detaching volume %s: %w", v.Name, err)
	}
	return m.waitVolume(ctx, v, fmt.Sprintf("volume %s to detach", v.Name), func(cv cloud.Volume) bool {
		return cv.State == cloud.VolumeAvailable
	})
}

// DeleteVolume unmounts, detaches and deletes the volume called name. Its
// snapshots stay, so the name can be provisioned again from them.
func (m *Manager) DeleteVolume(ctx context.Context, name string) error {
	v, err := m.FindVolume(ctx, name)
	if err != nil {
		return err
	}
	if err := m.Detach(ctx, v); err != nil {
		return err
	}
	if err := m.storage.DeleteVolume(ctx, v.Cloud.ID); err != nil {
		return fmt.Errorf("deleting volume %s: %w", name, err)
	}
	_, _ = fmt.Fprintf(m.out, "deleted volume %s (%s)\n", name, v.Cloud.ID)
	return nil
}

// Snapshot snapshots the volume called name (flushing its server's
// buffers first) and waits until the snapshot is complete. The snapshot
// carries the volume's name, so a later ProvisionVolume of that name
// starts from it.
func (m *Manager) Snapshot(ctx context.Context, name, description string) (cloud.Snapshot, error) {
	v, err := m.FindVolume(ctx, name)
	if err != nil {
		return cloud.Snapshot{}, err
	}
	if description == "" {
		description = fmt.Sprintf("Hangar staging volume %s, %s", name, time.Now().UTC().Format(time.RFC3339))
	}
	if srv := m.FindServerByInstance(v.Cloud.InstanceID); srv != nil && srv.Instance.State == cloud.StateRunning {
		if _, err := srvOutput(ctx, srv, srv.privileged("sync")); err != nil {
			return cloud.Snapshot{}, fmt.Errorf("flushing volume %s before its snapshot: %w", name, err)
		}
	}
	tags := map[string]string{TagRole: "snapshot", TagName: name, TagFSType: v.FSType, TagMount: v.Mount}
	if v.Label != "" {
		tags[TagLabel] = v.Label
	}
	snap, err := m.storage.CreateSnapshot(ctx, v.Cloud.ID, description, tags)
	if err != nil {
		return cloud.Snapshot{}, fmt.Errorf("snapshotting volume %s: %w", name, err)
	}
	return m.waitSnapshot(ctx, snap.ID)
}

// waitSnapshot waits until the snapshot is completed, showing progress.
func (m *Manager) waitSnapshot(ctx context.Context, id string) (cloud.Snapshot, error) {
	var snap cloud.Snapshot
	last := ""
	err := m.waitFor(ctx, "snapshot "+id, 24*time.Hour, func(ctx context.Context) (bool, error) {
		ss, err := m.storage.Snapshots(ctx, cloud.Filter{IDs: []string{id}})
		if err != nil {
			return false, err
		}
		if len(ss) == 0 {
			return false, nil // eventual consistency right after creation
		}
		snap = ss[0]
		if snap.Progress != last && snap.State == cloud.SnapshotPending {
			_, _ = fmt.Fprintf(m.out, "snapshot %s: %s\n", id, snap.Progress)
			last = snap.Progress
		}
		switch snap.State {
		case cloud.SnapshotCompleted:
			return true, nil
		case cloud.SnapshotError:
			return false, fmt.Errorf("snapshot %s failed", id)
		}
		return false, nil
	})
	return snap, err
}

// Snapshots lists the staging snapshots in the region, newest first.
func (m *Manager) Snapshots(ctx context.Context) ([]cloud.Snapshot, error) {
	ss, err := m.storage.Snapshots(ctx, cloud.Filter{Tags: map[string]string{TagRole: "snapshot"}})
	if err != nil {
		return nil, fmt.Errorf("listing staging snapshots: %w", err)
	}
	slices.SortFunc(ss, func(a, b cloud.Snapshot) int { return b.StartedAt.Compare(a.StartedAt) })
	return ss, nil
}

// DD copies the whole of volume src onto volume dst, block for block,
// with dd over ssh (the Perl manager's dd): partition tables, LVM, any
// filesystem. Both are attached to staging servers (any, in any zone) and
// unmounted first; dst must be at least as large. It returns the bytes
// copied.
func (m *Manager) DD(ctx context.Context, srcName, dstName string) (int64, error) {
	fail := func(err error) (int64, error) {
		return 0, fmt.Errorf("copying volume %s onto %s with dd: %w", srcName, dstName, err)
	}
	if srcName == dstName {
		return fail(errors.New("a volume cannot be copied onto itself"))
	}
	var vols [2]*Volume
	var srvs [2]*Server
	for i, name := range []string{srcName, dstName} {
		v, err := m.FindVolume(ctx, name)
		if err != nil {
			return fail(err)
		}
		srv, err := m.Mount(ctx, v)
		if err != nil {
			return fail(err)
		}
		if v.Directory {
			return fail(fmt.Errorf("volume %s is a directory on this cloud, not a block device; copy it with rsync", name))
		}
		if err := m.unmount(ctx, v, srv); err != nil {
			return fail(err)
		}
		vols[i], srvs[i] = v, srv
	}
	if vols[1].Cloud.SizeGB < vols[0].Cloud.SizeGB {
		return fail(fmt.Errorf("%s has %d GB, less than the %d GB of %s", dstName, vols[1].Cloud.SizeGB, vols[0].Cloud.SizeGB, srcName))
	}
	from, err := srvs[0].Client(ctx)
	if err != nil {
		return fail(err)
	}
	to, err := srvs[1].Client(ctx)
	if err != nil {
		return fail(err)
	}
	n, err := BlockCopy(ctx, from, vols[0].Device, m.opts.Sudo, to, vols[1].Device, m.opts.Sudo, m.liveProgress())
	if err != nil {
		return fail(err)
	}
	return n, nil
}
