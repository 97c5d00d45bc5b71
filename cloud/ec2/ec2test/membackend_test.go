package ec2test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// memBackend is a cloud.Provider and cloud.Storage held in memory: a fake
// that checks what ec2test forwards to a storage backend, refusing what a
// real cloud refuses (an unknown key, a volume of another zone, a copy
// from a region it does not have). Its volume and snapshot ids are not
// EC2-shaped, so a test sees ec2test map them. While hold is set, what it
// makes stays creating or pending until release.
type memBackend struct {
	mu        sync.Mutex
	hold      bool
	n         int
	instances map[string]*cloud.Instance
	keys      map[string]string
	volumes   map[string]*cloud.Volume
	snapshots map[string]*cloud.Snapshot
	images    map[string]*cloud.Image
	calls     []string // "CopySnapshot mem-1 mem-snap-2", in order
}

var (
	_ cloud.Provider = (*memBackend)(nil)
	_ cloud.Storage  = (*memBackend)(nil)
)

const memRegion = "mem-1"

func newMemBackend() *memBackend {
	return &memBackend{
		instances: map[string]*cloud.Instance{}, keys: map[string]string{},
		volumes: map[string]*cloud.Volume{}, snapshots: map[string]*cloud.Snapshot{}, images: map[string]*cloud.Image{},
	}
}

func (b *memBackend) record(format string, args ...any) {
	b.calls = append(b.calls, fmt.Sprintf(format, args...))
}

// setHold holds (or not) what is made from now on.
func (b *memBackend) setHold(hold bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.hold = hold
}

// release finishes everything held.
func (b *memBackend) release() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.hold = false
	for _, v := range b.volumes {
		if v.State == cloud.VolumeCreating {
			v.State = cloud.VolumeAvailable
		}
	}
	for _, sn := range b.snapshots {
		if sn.State == cloud.SnapshotPending {
			sn.State, sn.Progress = cloud.SnapshotCompleted, "100%"
		}
	}
}

func (b *memBackend) callLog() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.calls)
}

func (b *memBackend) volume(id string) (cloud.Volume, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	v, ok := b.volumes[id]
	if !ok {
		return cloud.Volume{}, false
	}
	return *v, true
}

func (b *memBackend) Capabilities() cloud.Capabilities {
	return cloud.Capabilities{StopStart: true, ConsoleOutput: true}
}

func (b *memBackend) Launch(_ context.Context, spec cloud.LaunchSpec, n int) ([]cloud.Instance, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.record("Launch %s %s", spec.Image, spec.KeyName)
	if spec.KeyName != "" && b.keys[spec.KeyName] == "" {
		return nil, fmt.Errorf("launching: key pair %q is not known", spec.KeyName)
	}
	// Like the local cloud, ids of its own shape name its images; other
	// strings are labels.
	if strings.HasPrefix(spec.Image, "mem-ami-") && b.images[spec.Image] == nil {
		return nil, fmt.Errorf("launching: no image %s", spec.Image)
	}
	var out []cloud.Instance
	for range n {
		b.n++
		in := &cloud.Instance{
			ID: newHexID("i-"), State: cloud.StateRunning, PrivateIP: fmt.Sprintf("10.9.0.%d", b.n),
			PublicIP: fmt.Sprintf("198.51.100.%d", b.n), Zone: spec.Zones[0], Image: spec.Image,
			Tags: maps.Clone(spec.Tags), LaunchedAt: time.Now(),
		}
		b.instances[in.ID] = in
		out = append(out, *in)
	}
	return out, nil
}

func (b *memBackend) List(_ context.Context, tags map[string]string) ([]cloud.Instance, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []cloud.Instance
	for _, in := range b.instances {
		if cloud.MatchesTags(in.Tags, tags) {
			out = append(out, *in)
		}
	}
	return out, nil
}

func (b *memBackend) setState(ids []string, to cloud.State) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, id := range ids {
		if in := b.instances[id]; in != nil {
			in.State = to
		}
		if to == cloud.StateTerminated {
			for _, v := range b.volumes {
				if v.InstanceID == id {
					v.InstanceID, v.Device, v.AttachmentState, v.State = "", "", "", cloud.VolumeAvailable
				}
			}
		}
	}
	return ids
}

func (b *memBackend) Terminate(_ context.Context, ids []string) ([]string, error) {
	return b.setState(ids, cloud.StateTerminated), nil
}

func (b *memBackend) Stop(_ context.Context, ids []string) ([]string, error) {
	return b.setState(ids, cloud.StateStopped), nil
}

func (b *memBackend) Start(_ context.Context, ids []string) ([]string, error) {
	return b.setState(ids, cloud.StateRunning), nil
}

func (b *memBackend) ConsoleOutput(_ context.Context, id string) ([]byte, error) {
	return []byte("mem: " + id + " booted\n"), nil
}

func (b *memBackend) Close() error { return nil }

func (b *memBackend) Region() string { return memRegion }

func (b *memBackend) ImportKeyPair(_ context.Context, name string, publicKey []byte) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.record("ImportKeyPair %s", name)
	key := strings.TrimSpace(string(publicKey))
	if have, ok := b.keys[name]; ok && have != key {
		return fmt.Errorf("importing key pair %q: a different key has that name", name)
	}
	b.keys[name] = key
	return nil
}

func (b *memBackend) CreateVolume(_ context.Context, spec cloud.VolumeSpec) (cloud.Volume, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.record("CreateVolume %s %d %s", spec.Zone, spec.SizeGB, spec.SnapshotID)
	if spec.SnapshotID != "" {
		sn := b.snapshots[spec.SnapshotID]
		if sn == nil || sn.State != cloud.SnapshotCompleted {
			return cloud.Volume{}, fmt.Errorf("creating volume: snapshot %s is not there or not completed", spec.SnapshotID)
		}
	}
	b.n++
	v := &cloud.Volume{
		ID: fmt.Sprintf("mem-vol-%d", b.n), State: cloud.VolumeAvailable, SizeGB: spec.SizeGB, Zone: spec.Zone,
		SnapshotID: spec.SnapshotID, Tags: maps.Clone(spec.Tags), CreatedAt: time.Now(),
	}
	if b.hold {
		v.State = cloud.VolumeCreating
	}
	b.volumes[v.ID] = v
	return *v, nil
}

func (b *memBackend) Volumes(_ context.Context, f cloud.Filter) ([]cloud.Volume, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []cloud.Volume
	for _, v := range b.volumes {
		if (len(f.IDs) == 0 || slices.Contains(f.IDs, v.ID)) && cloud.MatchesTags(v.Tags, f.Tags) {
			out = append(out, *v)
		}
	}
	return out, nil
}

func (b *memBackend) AttachVolume(_ context.Context, volumeID, instanceID, device string) (cloud.Volume, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.record("AttachVolume %s %s %s", volumeID, instanceID, device)
	v, in := b.volumes[volumeID], b.instances[instanceID]
	switch {
	case v == nil || in == nil:
		return cloud.Volume{}, fmt.Errorf("attaching: no volume %s or instance %s", volumeID, instanceID)
	case v.State != cloud.VolumeAvailable:
		return cloud.Volume{}, fmt.Errorf("attaching: volume %s is %s", volumeID, v.State)
	case v.Zone != in.Zone:
		return cloud.Volume{}, fmt.Errorf("attaching: volume in %s, instance in %s", v.Zone, in.Zone)
	}
	v.InstanceID, v.Device, v.AttachmentState, v.State = instanceID, device, "attached", cloud.VolumeInUse
	return *v, nil
}

func (b *memBackend) DetachVolume(_ context.Context, volumeID string, force bool) (cloud.Volume, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.record("DetachVolume %s %v", volumeID, force)
	v := b.volumes[volumeID]
	if v == nil || v.InstanceID == "" {
		return cloud.Volume{}, fmt.Errorf("detaching: volume %s is not attached", volumeID)
	}
	v.InstanceID, v.Device, v.AttachmentState, v.State = "", "", "", cloud.VolumeAvailable
	return *v, nil
}

func (b *memBackend) DeleteVolume(_ context.Context, volumeID string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.record("DeleteVolume %s", volumeID)
	if v := b.volumes[volumeID]; v != nil && v.InstanceID != "" {
		return fmt.Errorf("deleting: volume %s is attached", volumeID)
	}
	delete(b.volumes, volumeID)
	return nil
}

func (b *memBackend) newSnapshot(size int, volumeID, description string, tags map[string]string) *cloud.Snapshot {
	b.n++
	sn := &cloud.Snapshot{
		ID: fmt.Sprintf("mem-snap-%d", b.n), VolumeID: volumeID, State: cloud.SnapshotCompleted, Progress: "100%",
		SizeGB: size, Description: description, Tags: maps.Clone(tags), StartedAt: time.Now(),
	}
	if b.hold {
		sn.State, sn.Progress = cloud.SnapshotPending, "0%"
	}
	b.snapshots[sn.ID] = sn
	return sn
}

func (b *memBackend) CreateSnapshot(_ context.Context, volumeID, description string, tags map[string]string) (cloud.Snapshot, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.record("CreateSnapshot %s", volumeID)
	v := b.volumes[volumeID]
	if v == nil {
		return cloud.Snapshot{}, fmt.Errorf("snapshotting: no volume %s", volumeID)
	}
	return *b.newSnapshot(v.SizeGB, volumeID, description, tags), nil
}

func (b *memBackend) Snapshots(_ context.Context, f cloud.Filter) ([]cloud.Snapshot, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []cloud.Snapshot
	for _, sn := range b.snapshots {
		if (len(f.IDs) == 0 || slices.Contains(f.IDs, sn.ID)) && cloud.MatchesTags(sn.Tags, f.Tags) {
			out = append(out, *sn)
		}
	}
	return out, nil
}

func (b *memBackend) DeleteSnapshot(_ context.Context, snapshotID string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.record("DeleteSnapshot %s", snapshotID)
	delete(b.snapshots, snapshotID)
	return nil
}

func (b *memBackend) CopySnapshot(_ context.Context, sourceRegion, snapshotID, description string, tags map[string]string) (cloud.Snapshot, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.record("CopySnapshot %s %s", sourceRegion, snapshotID)
	from := b.snapshots[snapshotID]
	switch {
	case sourceRegion != memRegion:
		return cloud.Snapshot{}, fmt.Errorf("copying: no region %s", sourceRegion)
	case from == nil || from.State != cloud.SnapshotCompleted:
		return cloud.Snapshot{}, fmt.Errorf("copying: snapshot %s is not there or not completed", snapshotID)
	}
	return *b.newSnapshot(from.SizeGB, "", description, tags), nil
}

func (b *memBackend) Images(_ context.Context, f cloud.Filter) ([]cloud.Image, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []cloud.Image
	for _, im := range b.images {
		if (len(f.IDs) == 0 || slices.Contains(f.IDs, im.ID)) && cloud.MatchesTags(im.Tags, f.Tags) {
			out = append(out, *im)
		}
	}
	return out, nil
}

// addImage registers an image of existing snapshots. Callers hold mu.
func (b *memBackend) addImage(spec cloud.ImageSpec) (cloud.Image, error) {
	for _, im := range b.images {
		if im.Name == spec.Name {
			return cloud.Image{}, fmt.Errorf("registering image: the name %q is taken", spec.Name)
		}
	}
	for _, d := range spec.Devices {
		if b.snapshots[d.SnapshotID] == nil {
			return cloud.Image{}, fmt.Errorf("registering image: device %s: no snapshot %q", d.Device, d.SnapshotID)
		}
	}
	b.n++
	im := &cloud.Image{
		ID: fmt.Sprintf("mem-ami-%d", b.n), Name: spec.Name, Description: spec.Description, State: cloud.ImageAvailable,
		Architecture: spec.Architecture, RootDevice: spec.RootDevice, Devices: slices.Clone(spec.Devices), Tags: maps.Clone(spec.Tags), CreatedAt: time.Now(),
	}
	b.images[im.ID] = im
	return *im, nil
}

func (b *memBackend) CreateImage(_ context.Context, instanceID string, spec cloud.ImageSpec) (cloud.Image, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.record("CreateImage %s %s", instanceID, spec.Name)
	if b.instances[instanceID] == nil {
		return cloud.Image{}, fmt.Errorf("creating image: no instance %s", instanceID)
	}
	root := b.newSnapshot(8, "", "root of "+instanceID, spec.Tags)
	spec.RootDevice, spec.Devices = "/dev/xvda", []cloud.BlockDevice{{Device: "/dev/xvda", SnapshotID: root.ID, SizeGB: 8}}
	return b.addImage(spec)
}

func (b *memBackend) RegisterImage(_ context.Context, spec cloud.ImageSpec) (cloud.Image, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.record("RegisterImage %s", spec.Name)
	return b.addImage(spec)
}

// CopyImage: ec2test copies images by their snapshots, so a call here is
// a mistake.
func (b *memBackend) CopyImage(context.Context, string, string, cloud.ImageSpec) (cloud.Image, error) {
	return cloud.Image{}, errors.New("memBackend: ec2test copies images by their snapshots")
}

func (b *memBackend) DeregisterImage(_ context.Context, imageID string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.record("DeregisterImage %s", imageID)
	delete(b.images, imageID)
	return nil
}

func (b *memBackend) Tag(_ context.Context, id string, tags map[string]string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.record("Tag %s", id)
	var have *map[string]string
	switch {
	case b.volumes[id] != nil:
		have = &b.volumes[id].Tags
	case b.snapshots[id] != nil:
		have = &b.snapshots[id].Tags
	case b.images[id] != nil:
		have = &b.images[id].Tags
	default:
		return fmt.Errorf("tagging %s: %w", id, cloud.ErrNotFound)
	}
	if *have == nil {
		*have = map[string]string{}
	}
	maps.Copy(*have, tags)
	return nil
}
