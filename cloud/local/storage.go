package local

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/cloud"
)

// The local cloud's storage: volumes and snapshots are directories (or, for
// raw volumes, sparse image files) under the region's storage/ directory,
// copied with cp --reflink=auto, so that they cost nothing on btrfs or XFS
// and a plain copy elsewhere. Every call finishes before it returns: volumes
// are available, snapshots completed and images available at once.
//
// Long copies run without the lock, into storage/tmp, and are renamed into
// place under it, so the rest of the cloud does not wait for them and a
// crash never leaves a half-made volume or snapshot listed.

var _ cloud.Storage = (*Provider)(nil)

const (
	maxVolumeGB = 16384 // EC2's limit for gp3
	// rootDevice is the device CreateImage gives the instance's disk.
	rootDevice = "/dev/xvda"
)

var (
	keyNameRE   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$`)
	zoneRE      = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)
	deviceRE    = regexp.MustCompile(`^/dev/(sd|xvd)([b-z])$`)
	imageNameRE = regexp.MustCompile(`^[A-Za-z0-9()\[\]./\-'@_ ]{3,128}$`)
)

func validKeyName(name string) error {
	if !keyNameRE.MatchString(name) {
		return fmt.Errorf("invalid key pair name %q: use 1 to 255 letters, digits, '.', '_' or '-', starting with a letter or digit", name)
	}
	return nil
}

// volumeRecord is a volume as stored in volume.json.
type volumeRecord struct {
	ID          string            `json:"id"`
	SizeGB      int               `json:"size_gb"`
	Zone        string            `json:"zone"`
	SnapshotID  string            `json:"snapshot_id,omitempty"`
	Raw         bool              `json:"raw,omitempty"`
	Tags        map[string]string `json:"tags,omitempty"`
	CreatedAt   time.Time         `json:"created_at"`
	ClientToken string            `json:"client_token,omitempty"`
	// The attachment. An attachment to an instance that has since been
	// terminated no longer counts: terminating detaches, as on EC2.
	InstanceID string `json:"instance_id,omitempty"`
	Device     string `json:"device,omitempty"`
}

// snapshotRecord is a snapshot as stored in snapshot.json.
type snapshotRecord struct {
	ID          string            `json:"id"`
	VolumeID    string            `json:"volume_id,omitempty"`
	SizeGB      int               `json:"size_gb"`
	Raw         bool              `json:"raw,omitempty"`
	Description string            `json:"description,omitempty"`
	Tags        map[string]string `json:"tags,omitempty"`
	StartedAt   time.Time         `json:"started_at"`
}

func (s *snapshotRecord) snapshot() cloud.Snapshot {
	return cloud.Snapshot{
		ID:          s.ID,
		VolumeID:    s.VolumeID,
		State:       cloud.SnapshotCompleted,
		Progress:    "100%",
		SizeGB:      s.SizeGB,
		Description: s.Description,
		Tags:        maps.Clone(s.Tags),
		StartedAt:   s.StartedAt,
	}
}

// imageRecord is an image as stored in images/<id>.json.
type imageRecord struct {
	cloud.Image
	ClientToken string `json:"client_token,omitempty"`
}

func (img *imageRecord) rootDevice() (cloud.BlockDevice, bool) {
	for _, d := range img.Devices {
		if d.Device == img.RootDevice {
			return d, true
		}
	}
	return cloud.BlockDevice{}, false
}

func (img *imageRecord) image() cloud.Image {
	out := img.Image
	out.Devices = slices.Clone(img.Devices)
	out.Tags = maps.Clone(img.Tags)
	return out
}

// Paths.

func (s *store) storagePath(elem ...string) string {
	return filepath.Join(append([]string{s.dir, "storage"}, elem...)...)
}
func (s *store) keyPairPath(name string) string { return s.storagePath("keypairs", name+".pub") }
func (s *store) volumeDir(id string) string     { return s.storagePath("volumes", id) }
func (s *store) snapshotDir(id string) string   { return s.storagePath("snapshots", id) }
func (s *store) imagePath(id string) string     { return s.storagePath("images", id+".json") }

// dataName is the name of the data inside a volume's or snapshot's directory.
func dataName(raw bool) string {
	if raw {
		return "disk.img"
	}
	return "data"
}

func (s *store) volumeData(v *volumeRecord) string {
	return filepath.Join(s.volumeDir(v.ID), dataName(v.Raw))
}
func (s *store) snapshotData(sn *snapshotRecord) string {
	return filepath.Join(s.snapshotDir(sn.ID), dataName(sn.Raw))
}

// tmpDir makes a directory in which an object with this id is built.
func (s *store) tmpDir(id string, now time.Time) (string, error) {
	dir := s.storagePath("tmp", fmt.Sprintf("%s.%d", id, now.Unix()))
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", err
	}
	return dir, nil
}

// Reading records. Each returns an error matching cloud.ErrNotFound for an
// id that is malformed or unknown.

func (s *store) getVolume(id string) (*volumeRecord, error) {
	var v volumeRecord
	if !validResourceID("vol", id) {
		return nil, fmt.Errorf("volume %q: %w", id, cloud.ErrNotFound)
	}
	if err := readJSON(filepath.Join(s.volumeDir(id), "volume.json"), &v); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("volume %s: %w", id, cloud.ErrNotFound)
	} else if err != nil {
		return nil, err
	}
	return &v, nil
}

func (s *store) getSnapshot(id string) (*snapshotRecord, error) {
	return getSnapshotIn(s.snapshotDir, id)
}

func getSnapshotIn(snapshotDir func(string) string, id string) (*snapshotRecord, error) {
	var sn snapshotRecord
	if !validResourceID("snap", id) {
		return nil, fmt.Errorf("snapshot %q: %w", id, cloud.ErrNotFound)
	}
	if err := readJSON(filepath.Join(snapshotDir(id), "snapshot.json"), &sn); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("snapshot %s: %w", id, cloud.ErrNotFound)
	} else if err != nil {
		return nil, err
	}
	return &sn, nil
}

func (s *store) getImage(id string) (*imageRecord, error) {
	var img imageRecord
	if !validResourceID("ami", id) {
		return nil, fmt.Errorf("image %q: %w", id, cloud.ErrNotFound)
	}
	if err := readJSON(s.imagePath(id), &img); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("image %s: %w", id, cloud.ErrNotFound)
	} else if err != nil {
		return nil, err
	}
	return &img, nil
}

// listIDs returns the ids of kind found as entries of dir (with suffix
// cut off), in order.
func listIDs(dir, kind, suffix string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, e := range ents {
		if id, ok := strings.CutSuffix(e.Name(), suffix); ok && validResourceID(kind, id) {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

// wanted returns the ids to read for f: its ids if it names any, else all.
func wanted(f cloud.Filter, all func() ([]string, error)) ([]string, error) {
	if len(f.IDs) > 0 {
		ids := slices.Clone(f.IDs)
		slices.Sort(ids)
		return slices.Compact(ids), nil
	}
	return all()
}

func (s *store) volumes(f cloud.Filter) ([]*volumeRecord, error) {
	return listRecords(s, f, "volume", "volumes", "vol", "", s.getVolume, func(v *volumeRecord) map[string]string { return v.Tags })
}

func (s *store) snapshots(f cloud.Filter) ([]*snapshotRecord, error) {
	return listRecords(s, f, "snapshot", "snapshots", "snap", "", s.getSnapshot, func(v *snapshotRecord) map[string]string { return v.Tags })
}

func (s *store) images(f cloud.Filter) ([]*imageRecord, error) {
	return listRecords(s, f, "image", "images", "ami", ".json", s.getImage, func(v *imageRecord) map[string]string { return v.Tags })
}

// listRecords reads the records f asks for (by id, else all under dir),
// keeping those whose tags match. A record deleted meanwhile, or an id asked
// for and unknown, is left out; an unreadable one is logged and left out.
func listRecords[T any](s *store, f cloud.Filter, what, dir, kind, suffix string, get func(string) (T, error), tags func(T) map[string]string) ([]T, error) {
	ids, err := wanted(f, func() ([]string, error) { return listIDs(s.storagePath(dir), kind, suffix) })
	if err != nil {
		return nil, err
	}
	var out []T
	for _, id := range ids {
		r, err := get(id)
		if errors.Is(err, cloud.ErrNotFound) {
			continue
		}
		if err != nil {
			s.log.Error("skipping unreadable "+what, "id", id, "err", err)
			continue
		}
		if cloud.MatchesTags(tags(r), f.Tags) {
			out = append(out, r)
		}
	}
	return out, nil
}

// copyData copies a volume's or snapshot's data, a directory or (raw) a
// sparse image file, to dst, which must not exist. cp shares the blocks
// where the filesystem can (btrfs, XFS) and copies them where it cannot.
func copyData(ctx context.Context, src, dst string, raw bool) error {
	args := []string{"-a", "--reflink=auto", "--no-target-directory", src, dst}
	if raw {
		args = []string{"--reflink=auto", "--sparse=always", "--preserve=mode,timestamps", "--no-target-directory", src, dst}
	}
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "cp", args...)
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("cp %s %s: %w: %s", src, dst, err, bytes.TrimSpace(stderr.Bytes()))
	}
	return nil
}

// Key pairs.

// ImportKeyPair stores the public key under name. The same key again is
// fine; another key under a taken name is an error.
func (p *Provider) ImportKeyPair(ctx context.Context, name string, publicKey []byte) error {
	if err := validKeyName(name); err != nil {
		return fmt.Errorf("importing key pair: %w", err)
	}
	key, _, _, rest, err := ssh.ParseAuthorizedKey(publicKey)
	if err != nil {
		return fmt.Errorf("importing key pair %q: parsing the public key: %w", name, err)
	}
	if len(bytes.TrimSpace(rest)) > 0 {
		return fmt.Errorf("importing key pair %q: more than one public key given", name)
	}
	unlock, err := p.store.lock(ctx)
	if err != nil {
		return fmt.Errorf("importing key pair %q: %w", name, err)
	}
	defer unlock()
	path := p.store.keyPairPath(name)
	if old, err := os.ReadFile(path); err == nil {
		have, _, _, _, err := ssh.ParseAuthorizedKey(old)
		if err != nil {
			return fmt.Errorf("importing key pair %q: reading the stored key: %w", name, err)
		}
		if !bytes.Equal(have.Marshal(), key.Marshal()) {
			return fmt.Errorf("importing key pair %q: the name is taken by another key (%s, not %s)",
				name, ssh.FingerprintSHA256(have), ssh.FingerprintSHA256(key))
		}
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("importing key pair %q: %w", name, err)
	}
	if err := writeFile(path, ssh.MarshalAuthorizedKey(key), 0o600); err != nil {
		return fmt.Errorf("importing key pair %q: %w", name, err)
	}
	p.log.Info("imported key pair", "name", name, "fingerprint", ssh.FingerprintSHA256(key))
	return nil
}

// Volumes.

// attachedTo returns the instance v is attached to, or nil when it is not
// attached (an attachment to a terminated instance ended with it).
func (p *Provider) attachedTo(v *volumeRecord) (*record, error) {
	if v.InstanceID == "" {
		return nil, nil
	}
	r, err := p.store.getRecord(v.InstanceID)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading instance %s of volume %s: %w", v.InstanceID, v.ID, err)
	}
	if r.State == cloud.StateTerminated {
		return nil, nil
	}
	return r, nil
}

// volume is v as the cloud reports it.
func (p *Provider) volume(v *volumeRecord) cloud.Volume {
	out := cloud.Volume{
		ID:         v.ID,
		State:      cloud.VolumeAvailable,
		SizeGB:     v.SizeGB,
		Zone:       v.Zone,
		SnapshotID: v.SnapshotID,
		Tags:       maps.Clone(v.Tags),
		CreatedAt:  v.CreatedAt,
	}
	r, err := p.attachedTo(v)
	if err != nil {
		// Better to show an attachment that may be gone than to offer
		// the volume for another.
		p.log.Warn("reading volume attachment", "volume", v.ID, "err", err)
	}
	if r != nil || err != nil {
		out.State = cloud.VolumeInUse
		out.InstanceID, out.Device, out.AttachmentState = v.InstanceID, v.Device, "attached"
	}
	return out
}

func (p *Provider) volumeByToken(token string) (*volumeRecord, error) {
	vs, err := p.store.volumes(cloud.Filter{})
	if err != nil {
		return nil, err
	}
	for _, v := range vs {
		if v.ClientToken == token {
			return v, nil
		}
	}
	return nil, nil
}

// CreateVolume makes an empty volume, or one holding a copy of a snapshot.
// A volume is a directory, or with spec.Raw a sparse image file of the
// size; a volume from a snapshot is of the snapshot's kind.
func (p *Provider) CreateVolume(ctx context.Context, spec cloud.VolumeSpec) (cloud.Volume, error) {
	fail := func(err error) (cloud.Volume, error) {
		return cloud.Volume{}, fmt.Errorf("creating local volume: %w", err)
	}
	if spec.Zone == "" {
		spec.Zone = defaultZone
	}
	if !zoneRE.MatchString(spec.Zone) {
		return fail(fmt.Errorf("invalid zone %q", spec.Zone))
	}
	if spec.SizeGB < 0 || spec.SizeGB > maxVolumeGB {
		return fail(fmt.Errorf("size %d GiB is not between 1 and %d", spec.SizeGB, maxVolumeGB))
	}
	if spec.SizeGB == 0 && spec.SnapshotID == "" {
		return fail(errors.New("a size is required for a volume not made from a snapshot"))
	}
	if len(spec.ClientToken) > 64 {
		return fail(errors.New("client token longer than 64 characters"))
	}
	if spec.ClientToken != "" {
		if v, err := p.volumeByToken(spec.ClientToken); err != nil {
			return fail(err)
		} else if v != nil {
			return p.volume(v), nil
		}
	}
	now := p.now()
	v := &volumeRecord{
		ID:          newResourceID("vol"),
		SizeGB:      spec.SizeGB,
		Zone:        spec.Zone,
		Raw:         spec.Raw,
		Tags:        maps.Clone(spec.Tags),
		CreatedAt:   now,
		ClientToken: spec.ClientToken,
	}
	for fileExists(p.store.volumeDir(v.ID)) {
		v.ID = newResourceID("vol")
	}
	tmp, err := p.store.tmpDir(v.ID, now)
	if err != nil {
		return fail(err)
	}
	defer func() { _ = os.RemoveAll(tmp) }() // fails harmlessly after the rename
	data := filepath.Join(tmp, dataName(v.Raw))

	var snap *snapshotRecord
	if spec.SnapshotID != "" {
		if snap, err = p.store.getSnapshot(spec.SnapshotID); err != nil {
			return fail(err)
		}
		if v.SizeGB == 0 {
			v.SizeGB = snap.SizeGB
		}
		if v.SizeGB < snap.SizeGB {
			return fail(fmt.Errorf("size %d GiB is less than the %d GiB of snapshot %s", v.SizeGB, snap.SizeGB, snap.ID))
		}
		v.SnapshotID, v.Raw = snap.ID, snap.Raw
		data = filepath.Join(tmp, dataName(v.Raw))
		if err := copyData(ctx, p.store.snapshotData(snap), data, v.Raw); err != nil {
			return fail(fmt.Errorf("copying snapshot %s: %w", snap.ID, err))
		}
	} else if v.Raw {
		if err := writeFile(data, nil, 0o600); err != nil {
			return fail(err)
		}
	} else if err := os.Mkdir(data, 0o755); err != nil {
		return fail(err)
	}
	if v.Raw {
		// Sparse: a new volume costs no space until written.
		if err := os.Truncate(data, int64(v.SizeGB)<<30); err != nil {
			return fail(err)
		}
	}
	if err := writeJSON(filepath.Join(tmp, "volume.json"), v); err != nil {
		return fail(err)
	}

	unlock, err := p.store.lock(ctx)
	if err != nil {
		return fail(err)
	}
	defer unlock()
	// A snapshot deleted while it was copied may have been copied in part.
	if snap != nil && !fileExists(p.store.snapshotDir(snap.ID)) {
		return fail(fmt.Errorf("snapshot %s was deleted while it was copied: %w", snap.ID, cloud.ErrNotFound))
	}
	if spec.ClientToken != "" {
		// A concurrent call with the same token finished first: its volume
		// is the one.
		if other, err := p.volumeByToken(spec.ClientToken); err != nil {
			return fail(err)
		} else if other != nil {
			return p.volume(other), nil
		}
	}
	if err := os.Rename(tmp, p.store.volumeDir(v.ID)); err != nil {
		return fail(err)
	}
	p.log.Info("created local volume", "id", v.ID, "size_gb", v.SizeGB, "snapshot", v.SnapshotID, "raw", v.Raw)
	return p.volume(v), nil
}

func fileExists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// Volumes returns the volumes that match f.
func (p *Provider) Volumes(ctx context.Context, f cloud.Filter) ([]cloud.Volume, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("listing local volumes: %w", err)
	}
	vs, err := p.store.volumes(f)
	if err != nil {
		return nil, fmt.Errorf("listing local volumes: %w", err)
	}
	out := make([]cloud.Volume, len(vs))
	for i, v := range vs {
		out[i] = p.volume(v)
	}
	return out, nil
}

// deviceSlot is what a device name occupies: the kernel shows /dev/sdf as
// /dev/xvdf, so the two are one slot (as on EC2).
func deviceSlot(device string) string {
	m := deviceRE.FindStringSubmatch(device)
	if m == nil {
		return ""
	}
	return m[2]
}

// deviceLink is where an attached volume appears inside the instance:
// $HANGAR_ROOT/dev/<sdf>, the local cloud's /dev.
func (p *Provider) deviceLink(instanceID, device string) string {
	return filepath.Join(p.store.instanceDir(instanceID), "disk", "dev", filepath.Base(device))
}

// AttachVolume attaches an available volume to a running or stopped instance
// in its zone: the volume's directory or image file appears inside the
// instance as the link $HANGAR_ROOT/dev/<basename of device>.
func (p *Provider) AttachVolume(ctx context.Context, volumeID, instanceID, device string) (cloud.Volume, error) {
	fail := func(err error) (cloud.Volume, error) {
		return cloud.Volume{}, fmt.Errorf("attaching volume %s to %s as %s: %w", volumeID, instanceID, device, err)
	}
	slot := deviceSlot(device)
	if slot == "" {
		return fail(errors.New("the device must be /dev/sd[b-z] or /dev/xvd[b-z]"))
	}
	unlock, err := p.store.lock(ctx)
	if err != nil {
		return fail(err)
	}
	defer unlock()
	v, err := p.store.getVolume(volumeID)
	if err != nil {
		return fail(err)
	}
	r, err := p.store.getRecord(instanceID)
	if errors.Is(err, fs.ErrNotExist) {
		return fail(fmt.Errorf("instance %s: %w", instanceID, cloud.ErrNotFound))
	}
	if err != nil {
		return fail(err)
	}
	switch r.State {
	case cloud.StateRunning, cloud.StateStopped:
	default:
		return fail(fmt.Errorf("instance is %s", r.State))
	}
	if r.Zone != v.Zone {
		return fail(fmt.Errorf("the volume is in zone %s and the instance in %s", v.Zone, r.Zone))
	}
	if at, err := p.attachedTo(v); err != nil {
		return fail(err)
	} else if at != nil {
		return fail(fmt.Errorf("the volume is in use, attached to %s as %s", v.InstanceID, v.Device))
	}
	all, err := p.store.volumes(cloud.Filter{})
	if err != nil {
		return fail(err)
	}
	for _, o := range all {
		if o.InstanceID == instanceID && deviceSlot(o.Device) == slot {
			return fail(fmt.Errorf("the instance has volume %s attached as %s already", o.ID, o.Device))
		}
	}

	link := p.deviceLink(instanceID, device)
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		return fail(err)
	}
	// A link left by a crash between linking and saving the volume goes;
	// anything else the instance put there stays, and the attach fails.
	if target, err := os.Readlink(link); err == nil && strings.HasPrefix(target, p.store.storagePath("volumes")+"/") {
		_ = os.Remove(link)
	}
	if err := os.Symlink(p.store.volumeData(v), link); err != nil {
		return fail(fmt.Errorf("linking the volume into the instance: %w", err))
	}
	v.InstanceID, v.Device = instanceID, device
	if err := writeJSON(filepath.Join(p.store.volumeDir(v.ID), "volume.json"), v); err != nil {
		_ = os.Remove(link)
		return fail(err)
	}
	p.log.Info("attached local volume", "id", v.ID, "instance", instanceID, "device", device)
	return p.volume(v), nil
}

// DetachVolume removes the volume's link from its instance.
func (p *Provider) DetachVolume(ctx context.Context, volumeID string, force bool) (cloud.Volume, error) {
	fail := func(err error) (cloud.Volume, error) {
		return cloud.Volume{}, fmt.Errorf("detaching volume %s: %w", volumeID, err)
	}
	unlock, err := p.store.lock(ctx)
	if err != nil {
		return fail(err)
	}
	defer unlock()
	v, err := p.store.getVolume(volumeID)
	if err != nil {
		return fail(err)
	}
	at, err := p.attachedTo(v)
	if err != nil {
		return fail(err)
	}
	if at == nil {
		return fail(errors.New("the volume is not attached"))
	}
	link := p.deviceLink(v.InstanceID, v.Device)
	// Only our own link: the instance may have replaced it with something
	// of its own.
	if target, err := os.Readlink(link); err == nil && target == p.store.volumeData(v) {
		if err := os.Remove(link); err != nil {
			return fail(err)
		}
	}
	v.InstanceID, v.Device = "", ""
	if err := writeJSON(filepath.Join(p.store.volumeDir(v.ID), "volume.json"), v); err != nil {
		return fail(err)
	}
	p.log.Info("detached local volume", "id", v.ID, "instance", at.ID)
	return p.volume(v), nil
}

// DeleteVolume deletes an available volume and its data.
func (p *Provider) DeleteVolume(ctx context.Context, volumeID string) error {
	unlock, err := p.store.lock(ctx)
	if err != nil {
		return fmt.Errorf("deleting volume %s: %w", volumeID, err)
	}
	v, err := p.store.getVolume(volumeID)
	if errors.Is(err, cloud.ErrNotFound) {
		unlock()
		return nil
	}
	if err != nil {
		unlock()
		return fmt.Errorf("deleting volume %s: %w", volumeID, err)
	}
	if at, err := p.attachedTo(v); err != nil || at != nil {
		unlock()
		if err != nil {
			return fmt.Errorf("deleting volume %s: %w", volumeID, err)
		}
		return fmt.Errorf("deleting volume %s: it is in use, attached to %s as %s", volumeID, v.InstanceID, v.Device)
	}
	trash, err := p.store.discard(p.store.volumeDir(v.ID), v.ID, p.now())
	unlock()
	if err != nil {
		return fmt.Errorf("deleting volume %s: %w", volumeID, err)
	}
	p.log.Info("deleted local volume", "id", v.ID)
	if err := os.RemoveAll(trash); err != nil {
		p.log.Warn("removing data of deleted volume", "path", trash, "err", err)
	}
	return nil
}

// Snapshots.

// CreateSnapshot copies the volume's data as it is now.
func (p *Provider) CreateSnapshot(ctx context.Context, volumeID, description string, tags map[string]string) (cloud.Snapshot, error) {
	fail := func(err error) (cloud.Snapshot, error) {
		return cloud.Snapshot{}, fmt.Errorf("snapshotting volume %s: %w", volumeID, err)
	}
	v, err := p.store.getVolume(volumeID)
	if err != nil {
		return fail(err)
	}
	sn := &snapshotRecord{
		VolumeID:    v.ID,
		SizeGB:      v.SizeGB,
		Raw:         v.Raw,
		Description: description,
		Tags:        maps.Clone(tags),
	}
	err = p.makeSnapshot(ctx, sn, p.store.volumeData(v), nil, func() error {
		if !fileExists(p.store.volumeDir(v.ID)) {
			return fmt.Errorf("the volume was deleted while it was copied: %w", cloud.ErrNotFound)
		}
		return nil
	})
	if err != nil {
		return fail(err)
	}
	return sn.snapshot(), nil
}

// makeSnapshot fills in sn's id and time, copies src into a new snapshot,
// calls edit (if not nil) on the copy, and puts the snapshot in place under
// the lock if stillThere, called under it, says the source still exists.
// The caller holds no lock: the copy may take long.
func (p *Provider) makeSnapshot(ctx context.Context, sn *snapshotRecord, src string, edit func(data string) error, stillThere func() error) error {
	sn.StartedAt = p.now()
	sn.ID = newResourceID("snap")
	for fileExists(p.store.snapshotDir(sn.ID)) {
		sn.ID = newResourceID("snap")
	}
	tmp, err := p.store.tmpDir(sn.ID, sn.StartedAt)
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	data := filepath.Join(tmp, dataName(sn.Raw))
	if err := copyData(ctx, src, data, sn.Raw); err != nil {
		return err
	}
	if edit != nil {
		if err := edit(data); err != nil {
			return err
		}
	}
	if err := writeJSON(filepath.Join(tmp, "snapshot.json"), sn); err != nil {
		return err
	}
	unlock, err := p.store.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	if err := stillThere(); err != nil {
		return err
	}
	if err := os.Rename(tmp, p.store.snapshotDir(sn.ID)); err != nil {
		return err
	}
	p.log.Info("created local snapshot", "id", sn.ID, "volume", sn.VolumeID, "size_gb", sn.SizeGB)
	return nil
}

// Snapshots returns the snapshots that match f.
func (p *Provider) Snapshots(ctx context.Context, f cloud.Filter) ([]cloud.Snapshot, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("listing local snapshots: %w", err)
	}
	sns, err := p.store.snapshots(f)
	if err != nil {
		return nil, fmt.Errorf("listing local snapshots: %w", err)
	}
	out := make([]cloud.Snapshot, len(sns))
	for i, sn := range sns {
		out[i] = sn.snapshot()
	}
	return out, nil
}

// DeleteSnapshot deletes a snapshot no image uses.
func (p *Provider) DeleteSnapshot(ctx context.Context, snapshotID string) error {
	unlock, err := p.store.lock(ctx)
	if err != nil {
		return fmt.Errorf("deleting snapshot %s: %w", snapshotID, err)
	}
	sn, err := p.store.getSnapshot(snapshotID)
	if errors.Is(err, cloud.ErrNotFound) {
		unlock()
		return nil
	}
	if err != nil {
		unlock()
		return fmt.Errorf("deleting snapshot %s: %w", snapshotID, err)
	}
	// As EC2: a registered image's disks must stay.
	imgs, err := p.store.images(cloud.Filter{})
	if err != nil {
		unlock()
		return fmt.Errorf("deleting snapshot %s: %w", snapshotID, err)
	}
	for _, img := range imgs {
		for _, d := range img.Devices {
			if d.SnapshotID == sn.ID {
				unlock()
				return fmt.Errorf("deleting snapshot %s: it is in use by image %s", snapshotID, img.ID)
			}
		}
	}
	trash, err := p.store.discard(p.store.snapshotDir(sn.ID), sn.ID, p.now())
	unlock()
	if err != nil {
		return fmt.Errorf("deleting snapshot %s: %w", snapshotID, err)
	}
	p.log.Info("deleted local snapshot", "id", sn.ID)
	if err := os.RemoveAll(trash); err != nil {
		p.log.Warn("removing data of deleted snapshot", "path", trash, "err", err)
	}
	return nil
}

// CopySnapshot copies a snapshot of sourceRegion (a region of the same
// Options.Dir, or this one) into this region.
func (p *Provider) CopySnapshot(ctx context.Context, sourceRegion, snapshotID, description string, tags map[string]string) (cloud.Snapshot, error) {
	fail := func(err error) (cloud.Snapshot, error) {
		return cloud.Snapshot{}, fmt.Errorf("copying snapshot %s from region %s: %w", snapshotID, sourceRegion, err)
	}
	if sourceRegion == "" {
		return fail(errors.New("no source region given"))
	}
	tree, err := regionDir(p.opts.Dir, sourceRegion)
	if err != nil {
		return fail(err)
	}
	if _, err := os.Stat(filepath.Join(tree, "storage")); errors.Is(err, fs.ErrNotExist) {
		return fail(fmt.Errorf("the local cloud has no region %s: %w", sourceRegion, cloud.ErrNotFound))
	}
	// The source tree is read without its lock: a snapshot never changes,
	// and one deleted during the copy is caught after it.
	srcDir := func(id string) string { return filepath.Join(tree, "storage", "snapshots", id) }
	src, err := getSnapshotIn(srcDir, snapshotID)
	if err != nil {
		return fail(err)
	}
	if description == "" {
		description = fmt.Sprintf("[Copied %s from %s]", src.ID, sourceRegion)
	}
	sn := &snapshotRecord{SizeGB: src.SizeGB, Raw: src.Raw, Description: description, Tags: maps.Clone(tags)}
	err = p.makeSnapshot(ctx, sn, filepath.Join(srcDir(src.ID), dataName(src.Raw)), nil, func() error {
		if !fileExists(srcDir(src.ID)) {
			return fmt.Errorf("the snapshot was deleted while it was copied: %w", cloud.ErrNotFound)
		}
		return nil
	})
	if err != nil {
		return fail(err)
	}
	return sn.snapshot(), nil
}

// Images.

// Images returns the images that match f.
func (p *Provider) Images(ctx context.Context, f cloud.Filter) ([]cloud.Image, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("listing local images: %w", err)
	}
	imgs, err := p.store.images(f)
	if err != nil {
		return nil, fmt.Errorf("listing local images: %w", err)
	}
	out := make([]cloud.Image, len(imgs))
	for i, img := range imgs {
		out[i] = img.image()
	}
	return out, nil
}

// checkImageName says why name cannot be a new image's, if it cannot. The
// caller holds the lock, or checks again under it.
func (p *Provider) checkImageName(name, token string) (*imageRecord, error) {
	if !imageNameRE.MatchString(name) {
		return nil, fmt.Errorf("invalid image name %q: use 3 to 128 letters, digits, spaces or ( ) [ ] . / - ' @ _", name)
	}
	imgs, err := p.store.images(cloud.Filter{})
	if err != nil {
		return nil, err
	}
	for _, img := range imgs {
		if token != "" && img.ClientToken == token {
			return img, nil // a retry: its image is the answer
		}
		if img.Name == name {
			return nil, fmt.Errorf("the name %q is taken by image %s", name, img.ID)
		}
	}
	return nil, nil
}

// RegisterImage registers an image whose disks are snapshots of this region.
func (p *Provider) RegisterImage(ctx context.Context, spec cloud.ImageSpec) (cloud.Image, error) {
	fail := func(err error) (cloud.Image, error) {
		return cloud.Image{}, fmt.Errorf("registering image %q: %w", spec.Name, err)
	}
	if len(spec.Devices) == 0 {
		return fail(errors.New("no devices given"))
	}
	if spec.RootDevice == "" {
		spec.RootDevice = spec.Devices[0].Device
	}
	if spec.Architecture == "" {
		spec.Architecture = "x86_64"
	}
	unlock, err := p.store.lock(ctx)
	if err != nil {
		return fail(err)
	}
	defer unlock()
	if old, err := p.checkImageName(spec.Name, spec.ClientToken); err != nil {
		return fail(err)
	} else if old != nil {
		return old.image(), nil
	}
	devices := make([]cloud.BlockDevice, len(spec.Devices))
	seen := map[string]bool{}
	var errs []error
	for i, d := range spec.Devices {
		devices[i] = d
		if !strings.HasPrefix(d.Device, "/dev/") || seen[d.Device] {
			errs = append(errs, fmt.Errorf("device %q is not a /dev/ name or is given twice", d.Device))
			continue
		}
		seen[d.Device] = true
		sn, err := p.store.getSnapshot(d.SnapshotID)
		if err != nil {
			errs = append(errs, fmt.Errorf("device %s: %w", d.Device, err))
			continue
		}
		if d.SizeGB == 0 {
			devices[i].SizeGB = sn.SizeGB
		} else if d.SizeGB < sn.SizeGB {
			errs = append(errs, fmt.Errorf("device %s: size %d GiB is less than the %d GiB of snapshot %s", d.Device, d.SizeGB, sn.SizeGB, sn.ID))
		}
	}
	if !seen[spec.RootDevice] {
		errs = append(errs, fmt.Errorf("root device %s is not one of the devices", spec.RootDevice))
	}
	if err := errors.Join(errs...); err != nil {
		return fail(err)
	}
	img, err := p.putImage(spec, devices)
	if err != nil {
		return fail(err)
	}
	return img.image(), nil
}

// putImage saves a new image. The caller holds the lock and has checked spec.
func (p *Provider) putImage(spec cloud.ImageSpec, devices []cloud.BlockDevice) (*imageRecord, error) {
	img := &imageRecord{
		Image: cloud.Image{
			ID:           newResourceID("ami"),
			Name:         spec.Name,
			Description:  spec.Description,
			State:        cloud.ImageAvailable,
			Architecture: spec.Architecture,
			RootDevice:   spec.RootDevice,
			Devices:      devices,
			Tags:         maps.Clone(spec.Tags),
			CreatedAt:    p.now(),
		},
		ClientToken: spec.ClientToken,
	}
	for fileExists(p.store.imagePath(img.ID)) {
		img.ID = newResourceID("ami")
	}
	if err := writeJSON(p.store.imagePath(img.ID), img); err != nil {
		return nil, err
	}
	p.log.Info("registered local image", "id", img.ID, "name", img.Name)
	return img, nil
}

// CreateImage makes an image of the instance: a snapshot of its disk, as
// root device /dev/xvda. Attached volumes are not part of it, and links to
// them are left out of the copy.
func (p *Provider) CreateImage(ctx context.Context, instanceID string, spec cloud.ImageSpec) (cloud.Image, error) {
	fail := func(err error) (cloud.Image, error) {
		return cloud.Image{}, fmt.Errorf("creating image %q of %s: %w", spec.Name, instanceID, err)
	}
	if spec.Architecture == "" {
		spec.Architecture = "x86_64"
	}
	spec.RootDevice = rootDevice
	if old, err := p.checkImageName(spec.Name, spec.ClientToken); err != nil {
		return fail(err)
	} else if old != nil {
		return old.image(), nil
	}
	r, err := p.store.getRecord(instanceID)
	if errors.Is(err, fs.ErrNotExist) {
		return fail(fmt.Errorf("instance %s: %w", instanceID, cloud.ErrNotFound))
	}
	if err != nil {
		return fail(err)
	}
	if r.State == cloud.StateTerminated || r.State == cloud.StateTerminating {
		return fail(fmt.Errorf("instance is %s", r.State))
	}
	rootGB := r.RootGB
	if rootGB == 0 {
		rootGB = defaultRootGB
	}
	sn := &snapshotRecord{
		SizeGB: rootGB,
		Tags:   maps.Clone(spec.Tags),
	}
	sn.Description = fmt.Sprintf("Created by CreateImage(%s) as %q", instanceID, spec.Name)
	var img *imageRecord
	disk := filepath.Join(p.store.instanceDir(r.ID), "disk")
	volumes := p.store.storagePath("volumes") + "/"
	err = p.makeSnapshot(ctx, sn, disk, func(data string) error {
		return removeLinksInto(data, volumes)
	}, func() error {
		// Under the lock: the name may have been taken meanwhile.
		old, err := p.checkImageName(spec.Name, spec.ClientToken)
		if err != nil {
			return err
		}
		if old != nil {
			img = old
			return errors.New("a retry of this call finished first")
		}
		return nil
	})
	if img != nil {
		return img.image(), nil
	}
	if err != nil {
		return fail(err)
	}
	// makeSnapshot has released the lock; take it again to register.
	unlock, err := p.store.lock(ctx)
	if err != nil {
		return fail(err)
	}
	defer unlock()
	if old, err := p.checkImageName(spec.Name, spec.ClientToken); err != nil || old != nil {
		if err == nil {
			return old.image(), nil
		}
		return fail(err)
	}
	img, err = p.putImage(spec, []cloud.BlockDevice{{Device: rootDevice, SnapshotID: sn.ID, SizeGB: sn.SizeGB}})
	if err != nil {
		return fail(err)
	}
	return img.image(), nil
}

// removeLinksInto removes the symbolic links under dir that point into
// prefix: attached volumes and the staging engine's mounts of them, which
// are no more part of a root disk than a mounted filesystem is.
func removeLinksInto(dir, prefix string) error {
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.Type()&fs.ModeSymlink == 0 {
			return err
		}
		if target, err := os.Readlink(path); err == nil && strings.HasPrefix(target, prefix) {
			return os.Remove(path)
		}
		return nil
	})
}

// CopyImage is not supported: the staging engine copies images itself, by
// copying their snapshots, which is the path the local cloud is there to
// exercise.
func (p *Provider) CopyImage(ctx context.Context, sourceRegion, imageID string, spec cloud.ImageSpec) (cloud.Image, error) {
	return cloud.Image{}, fmt.Errorf("copying image %s from region %s: %w", imageID, sourceRegion, cloud.ErrNotSupported)
}

// DeregisterImage removes the image; its snapshots stay.
func (p *Provider) DeregisterImage(ctx context.Context, imageID string) error {
	unlock, err := p.store.lock(ctx)
	if err != nil {
		return fmt.Errorf("deregistering image %s: %w", imageID, err)
	}
	defer unlock()
	if !validResourceID("ami", imageID) {
		return nil
	}
	if err := os.Remove(p.store.imagePath(imageID)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("deregistering image %s: %w", imageID, err)
	}
	p.log.Info("deregistered local image", "id", imageID)
	return nil
}

// Tag adds tags to a volume, snapshot or image (by the id's prefix),
// replacing values of keys it already has.
func (p *Provider) Tag(ctx context.Context, id string, tags map[string]string) error {
	unlock, err := p.store.lock(ctx)
	if err != nil {
		return fmt.Errorf("tagging %s: %w", id, err)
	}
	defer unlock()
	merge := func(have map[string]string) map[string]string {
		if have == nil {
			have = map[string]string{}
		}
		maps.Copy(have, tags)
		return have
	}
	switch {
	case strings.HasPrefix(id, "vol-"):
		v, err := p.store.getVolume(id)
		if err != nil {
			return fmt.Errorf("tagging %s: %w", id, err)
		}
		v.Tags = merge(v.Tags)
		err = writeJSON(filepath.Join(p.store.volumeDir(id), "volume.json"), v)
		return wrapErr("tagging "+id, err)
	case strings.HasPrefix(id, "snap-"):
		sn, err := p.store.getSnapshot(id)
		if err != nil {
			return fmt.Errorf("tagging %s: %w", id, err)
		}
		sn.Tags = merge(sn.Tags)
		err = writeJSON(filepath.Join(p.store.snapshotDir(id), "snapshot.json"), sn)
		return wrapErr("tagging "+id, err)
	case strings.HasPrefix(id, "ami-"):
		img, err := p.store.getImage(id)
		if err != nil {
			return fmt.Errorf("tagging %s: %w", id, err)
		}
		img.Tags = merge(img.Tags)
		return wrapErr("tagging "+id, writeJSON(p.store.imagePath(id), img))
	}
	return fmt.Errorf("tagging %q: not a volume, snapshot or image id: %w", id, cloud.ErrNotFound)
}

func wrapErr(what string, err error) error {
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}
