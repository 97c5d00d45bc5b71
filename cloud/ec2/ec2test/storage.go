package ec2test

// This file holds what clients make besides instances: key pairs, EBS
// volumes and snapshots (images are in images.go), each in one region, and
// what of them reaches a storage backend.
//
// With a Backend that implements cloud.Storage the data is real: ec2test
// forwards the key pairs, and the volumes and snapshots with their
// attachments, to the backend, and keeps for each volume and snapshot the
// backend's id (backendID) next to its own. ec2test ids stay EC2-shaped
// whatever the backend's look like, and one backend can stand behind
// every region: the backend has a single region of its own, so a copy from
// another ec2test region is a copy inside the backend (CopySnapshot with
// the backend's own region as the source). ec2test stays the authority on
// ids, states, attachments and tags; it asks the backend only whether what
// it made there is ready (a volume available, a snapshot completed), and
// shows the slower of the backend and its own delays.
//
// Images are forwarded too, so that an instance launched from one boots
// from its data: CreateImage makes the backend image the instance
// (CreateImage), RegisterImage and CopyImage register the backend's copies
// of the snapshots (RegisterImage), and RunInstances launches the backend
// image. The backend's image is named after the ec2test image id, since
// its one namespace of names serves every ec2test region. An image the
// backend has no copy of (those added by AddImage, DefaultImageID
// included) launches with a label instead: see backendImage.
//
// What stays in memory even with such a backend:
//   - the snapshot of an instance's root disk that CreateSnapshot makes
//     of its root volume id (the backend has no volume for it);
//   - deleting a key pair (cloud.Storage has no call for it). The backend
//     has one key-pair namespace for all regions, so the same name with
//     different keys in two regions fails at the backend;
//   - tags set after creation (CreateTags, DeleteTags): ec2test answers
//     for them; the backend keeps the tags a resource was made with.

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/cloud"
)

// Attachment states, as EC2 names them.
const (
	attaching = "attaching"
	attached  = "attached"
	detaching = "detaching"
)

type keyPair struct {
	id, name, fingerprint, keyType string
	publicKey                      string // the authorized_keys line
	tags                           map[string]string
	created                        time.Time
}

type volume struct {
	id, zone, snapshot, typ string
	size, iops, throughput  int
	encrypted, deleted      bool
	tags                    map[string]string
	created                 time.Time
	// state is creating, available or error; status() adds in-use.
	state   string
	readyAt time.Time // creating until then
	attach  *attachment
	seq     uint64
	// backendID is the backend's id for the volume, "" without a storage
	// backend. backendReady: the backend has reported it available (always
	// true without one).
	backendID    string
	backendReady bool
}

type attachment struct {
	instance, device, state string
	since, readyAt          time.Time // state changes at readyAt
}

type snapshot struct {
	id, volumeID, description string
	size                      int
	encrypted                 bool
	tags                      map[string]string
	started, readyAt          time.Time
	state                     string // pending, completed, error
	seq                       uint64
	backendID                 string
	backendReady              bool
}

// tokenRecord is what a ClientToken of CreateVolume or CopyImage made.
type tokenRecord struct {
	fingerprint string
	volume      *volume
	imageID     string
}

// copiedVolumeID is the volume id EC2 shows for a copied snapshot.
const copiedVolumeID = "vol-ffffffff"

// ---- views for tests ----

// KeyPair is a key pair as the server holds it.
type KeyPair struct {
	ID, Name, Fingerprint string
	Type                  string // "rsa" or "ed25519"
	PublicKey             string // authorized_keys line
	Tags                  map[string]string
}

// Volume is a volume as the server holds it.
type Volume struct {
	ID, Zone, State string // State as DescribeVolumes shows it
	SizeGB          int
	SnapshotID      string
	Type            string
	Tags            map[string]string
	// InstanceID, Device and AttachmentState describe the attachment.
	InstanceID, Device, AttachmentState string
	// BackendID is the backend's id for the volume, "" without a
	// storage backend.
	BackendID string
}

// Snapshot is a snapshot as the server holds it.
type Snapshot struct {
	ID, VolumeID, State, Progress, Description string
	SizeGB                                     int
	Tags                                       map[string]string
	BackendID                                  string
}

// KeyPairs lists the region's key pairs by name.
func (r *Region) KeyPairs() []KeyPair {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	var out []KeyPair
	for _, name := range slices.Sorted(maps.Keys(r.rg.keyPairs)) {
		k := r.rg.keyPairs[name]
		out = append(out, KeyPair{ID: k.id, Name: k.name, Fingerprint: k.fingerprint, Type: k.keyType, PublicKey: k.publicKey, Tags: maps.Clone(k.tags)})
	}
	return out
}

// AddKeyPair makes a key pair known without ImportKeyPair, so that
// launches naming it succeed; publicKey is an authorized_keys line. The
// backend is not told.
func (r *Region) AddKeyPair(name string, publicKey []byte) error {
	kp, err := parseKeyPair(name, publicKey)
	if err != nil {
		return err
	}
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	r.rg.keyPairs[name] = kp
	return nil
}

// Volumes lists the region's volumes in creation order (instances' root
// volumes are not among them).
func (r *Region) Volumes() []Volume {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	var out []Volume
	for _, v := range r.s.volumes(r.rg, time.Now()) {
		x := Volume{ID: v.id, Zone: v.zone, State: v.status(), SizeGB: v.size, SnapshotID: v.snapshot, Type: v.typ, Tags: maps.Clone(v.tags), BackendID: v.backendID}
		if a := v.attach; a != nil {
			x.InstanceID, x.Device, x.AttachmentState = a.instance, a.device, a.state
		}
		out = append(out, x)
	}
	return out
}

// Snapshots lists the region's snapshots in creation order.
func (r *Region) Snapshots() []Snapshot {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	var out []Snapshot
	now := time.Now()
	for _, sn := range r.rg.orderedSnapshots(now) {
		out = append(out, Snapshot{ID: sn.id, VolumeID: sn.volumeID, State: sn.state, Progress: sn.progress(now), Description: sn.description, SizeGB: sn.size, Tags: maps.Clone(sn.tags), BackendID: sn.backendID})
	}
	return out
}

// Images lists the region's images, those added by the test included.
func (r *Region) Images() []Image {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	var out []Image
	for i := range r.rg.images {
		im := &r.rg.images[i]
		r.s.settleImage(r.rg, im, time.Now())
		c := *im
		c.Tags, c.Devices = maps.Clone(im.Tags), slices.Clone(im.Devices)
		out = append(out, c)
	}
	return out
}

// ---- states ----

func (v *volume) status() string {
	switch {
	case v.deleted:
		return "deleted"
	case v.state == cloud.VolumeAvailable && v.attach != nil:
		return cloud.VolumeInUse
	}
	return v.state
}

// settleVolume moves a volume through its timed changes. EC2 detaches a
// volume from an instance that terminates. Callers hold mu.
func (s *Server) settleVolume(rg *region, v *volume, now time.Time) {
	if v.state == cloud.VolumeCreating && v.backendReady && !now.Before(v.readyAt) {
		v.state = cloud.VolumeAvailable
	}
	a := v.attach
	if a == nil {
		return
	}
	if !now.Before(a.readyAt) {
		switch a.state {
		case attaching:
			a.state = attached
		case detaching:
			v.attach = nil
			return
		}
	}
	in := rg.instances[a.instance]
	if in != nil {
		s.settle(in, now)
	}
	if in == nil || in.state == terminated {
		v.attach = nil
	}
}

// volumes settles the region's volumes and returns them in creation
// order. Callers hold mu.
func (s *Server) volumes(rg *region, now time.Time) []*volume {
	out := slices.Collect(maps.Values(rg.volumes))
	for _, v := range out {
		s.settleVolume(rg, v, now)
	}
	slices.SortFunc(out, func(a, b *volume) int { return cmp.Compare(a.seq, b.seq) })
	return out
}

// attachedTo lists the volumes attached (or attaching, detaching) to an
// instance, by device. Callers hold mu.
func (s *Server) attachedTo(rg *region, instanceID string, now time.Time) []*volume {
	var out []*volume
	for _, v := range rg.volumes {
		if v.attach != nil && v.attach.instance == instanceID {
			s.settleVolume(rg, v, now)
			if v.attach != nil {
				out = append(out, v)
			}
		}
	}
	slices.SortFunc(out, func(a, b *volume) int { return strings.Compare(a.attach.device, b.attach.device) })
	return out
}

func (sn *snapshot) settle(now time.Time) {
	if sn.state == cloud.SnapshotPending && sn.backendReady && !now.Before(sn.readyAt) {
		sn.state = cloud.SnapshotCompleted
	}
}

// progress rises with the time SnapshotDelay allows; a snapshot the
// backend still works on stops at 99%.
func (sn *snapshot) progress(now time.Time) string {
	switch sn.state {
	case cloud.SnapshotCompleted:
		return "100%"
	case cloud.SnapshotError:
		return "0%"
	}
	pct := 99
	if total := sn.readyAt.Sub(sn.started); total > 0 {
		pct = min(99, int(100*now.Sub(sn.started)/total))
	}
	return strconv.Itoa(pct) + "%"
}

// orderedSnapshots settles the region's snapshots and returns them in
// creation order. Callers hold mu.
func (rg *region) orderedSnapshots(now time.Time) []*snapshot {
	out := slices.Collect(maps.Values(rg.snapshots))
	for _, sn := range out {
		sn.settle(now)
	}
	slices.SortFunc(out, func(a, b *snapshot) int { return cmp.Compare(a.seq, b.seq) })
	return out
}

// findImage finds and settles an image. Callers hold mu.
func (s *Server) findImage(rg *region, id string, now time.Time) *Image {
	for i := range rg.images {
		if rg.images[i].ID == id {
			im := &rg.images[i]
			s.settleImage(rg, im, now)
			return im
		}
	}
	return nil
}

// settleImage makes a pending image available once ImageDelay has passed,
// the backend has it, and its snapshots are complete (failed if one
// failed). Callers hold mu.
func (s *Server) settleImage(rg *region, im *Image, now time.Time) {
	if im.State != cloud.ImagePending || im.readyAt.IsZero() || now.Before(im.readyAt) || !im.backendReady {
		return
	}
	for _, d := range im.Devices {
		sn := rg.snapshots[d.SnapshotID]
		if sn == nil {
			continue
		}
		sn.settle(now)
		switch sn.state {
		case cloud.SnapshotError:
			im.State = cloud.ImageFailed
			return
		case cloud.SnapshotPending:
			return
		}
	}
	im.State = cloud.ImageAvailable
}

func (s *Server) imageByName(rg *region, name string) *Image {
	for i := range rg.images {
		if rg.images[i].Name == name && rg.images[i].Owner == s.opts.Account {
			return &rg.images[i]
		}
	}
	return nil
}

func (rg *region) keyPairByID(id string) *keyPair {
	for _, k := range rg.keyPairs {
		if k.id == id {
			return k
		}
	}
	return nil
}

func (s *Server) hasKeyPair(rg *region, name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return rg.keyPairs[name] != nil
}

// nextSeq numbers a new resource. Callers hold mu.
func (s *Server) nextSeq() uint64 {
	s.seq++
	return s.seq
}

// newID makes an id of prefix no resource in taken has.
func newID[T any](prefix string, taken map[string]T) string {
	for {
		id := newHexID(prefix)
		if _, ok := taken[id]; !ok {
			return id
		}
	}
}

// ---- the backend ----

// storage is the backend's storage half, nil if it has none.
func (s *Server) storage() cloud.Storage {
	st, _ := s.opts.Backend.(cloud.Storage)
	return st
}

func backendError(doing string, err error) error {
	return errorf("InternalError", "An internal error has occurred: backend: %s: %v", doing, err)
}

// backendImage is the image a launch on the backend boots from: the
// backend's copy of im when it has one. A storage backend has images of
// its own, which ec2test's ids would not name, so it gets a label naming
// the ec2test image instead; another backend gets the ec2test id, as ever.
func (s *Server) backendImage(im Image) string {
	switch {
	case im.backendID != "":
		return im.backendID
	case s.storage() != nil:
		return "ec2test/" + im.ID
	}
	return im.ID
}

// refresh asks the backend about what it has not yet reported ready in
// the regions: volumes still creating, snapshots still pending, images
// not yet available.
func (s *Server) refresh(ctx context.Context, rgs ...*region) error {
	st := s.storage()
	if st == nil {
		return nil
	}
	s.mu.Lock()
	vols := map[string]*volume{}
	snaps := map[string]*snapshot{}
	images := map[string]*Image{}
	for _, rg := range rgs {
		for i := range rg.images {
			if im := &rg.images[i]; !im.backendReady {
				images[im.backendID] = im
			}
		}
		for _, v := range rg.volumes {
			if !v.backendReady && !v.deleted {
				vols[v.backendID] = v
			}
		}
		for _, sn := range rg.snapshots {
			if !sn.backendReady {
				snaps[sn.backendID] = sn
			}
		}
	}
	s.mu.Unlock()
	if len(vols) > 0 {
		got, err := st.Volumes(ctx, cloud.Filter{IDs: slices.Sorted(maps.Keys(vols))})
		if err != nil {
			return backendError("listing volumes", err)
		}
		s.mu.Lock()
		for _, bv := range got {
			v := vols[bv.ID]
			switch {
			case v == nil:
			case bv.State == cloud.VolumeError:
				v.state, v.backendReady = cloud.VolumeError, true
			case bv.State != cloud.VolumeCreating:
				v.backendReady = true
			}
		}
		s.mu.Unlock()
	}
	if len(snaps) > 0 {
		got, err := st.Snapshots(ctx, cloud.Filter{IDs: slices.Sorted(maps.Keys(snaps))})
		if err != nil {
			return backendError("listing snapshots", err)
		}
		s.mu.Lock()
		for _, bs := range got {
			sn := snaps[bs.ID]
			switch {
			case sn == nil:
			case bs.State == cloud.SnapshotError:
				sn.state, sn.backendReady = cloud.SnapshotError, true
			case bs.State == cloud.SnapshotCompleted:
				sn.backendReady = true
			}
		}
		s.mu.Unlock()
	}
	if len(images) > 0 {
		got, err := st.Images(ctx, cloud.Filter{IDs: slices.Sorted(maps.Keys(images))})
		if err != nil {
			return backendError("listing images", err)
		}
		s.mu.Lock()
		for _, bi := range got {
			im := images[bi.ID]
			switch {
			case im == nil:
			case bi.State == cloud.ImageFailed:
				im.State, im.backendReady = cloud.ImageFailed, true
			case bi.State == cloud.ImageAvailable:
				im.backendReady = true
			}
		}
		s.mu.Unlock()
	}
	return nil
}

// registerInBackend registers the backend's copy of an image made of
// snapshots the backend has, named after the ec2test id. An image whose
// root snapshot the backend lacks stays in memory only.
func (s *Server) registerInBackend(ctx context.Context, im *Image, backendSnaps map[string]string) error {
	st := s.storage()
	if st == nil || backendSnaps[im.RootDevice] == "" {
		return nil
	}
	spec := cloud.ImageSpec{Name: im.ID, Description: im.Name, Architecture: im.Architecture, RootDevice: im.RootDevice, Tags: im.Tags}
	for _, d := range im.Devices {
		if b := backendSnaps[d.Device]; b != "" {
			spec.Devices = append(spec.Devices, cloud.BlockDevice{Device: d.Device, SnapshotID: b, SizeGB: d.SizeGB})
		}
	}
	bi, err := st.RegisterImage(ctx, spec)
	if err != nil {
		return backendError("registering image", err)
	}
	im.backendID, im.backendReady = bi.ID, bi.State == cloud.ImageAvailable
	return nil
}

// ---- key pairs ----

// parseKeyPair reads an OpenSSH public key as EC2's ImportKeyPair does:
// RSA and Ed25519 only, fingerprinted as EC2 fingerprints imported keys
// (MD5 of the key for RSA, base64 SHA-256 for Ed25519).
func parseKeyPair(name string, material []byte) (*keyPair, error) {
	pub, comment, _, _, err := ssh.ParseAuthorizedKey(material)
	if err != nil {
		return nil, errorf("InvalidKey.Format", "Key is not in valid OpenSSH public key format")
	}
	kp := &keyPair{name: name, id: newHexID("key-"), created: time.Now()}
	switch pub.Type() {
	case ssh.KeyAlgoRSA:
		kp.keyType, kp.fingerprint = "rsa", ssh.FingerprintLegacyMD5(pub)
	case ssh.KeyAlgoED25519:
		sum := sha256.Sum256(pub.Marshal())
		kp.keyType, kp.fingerprint = "ed25519", base64.StdEncoding.EncodeToString(sum[:])
	default:
		return nil, errorf("InvalidKey.Format", "Key type %s is not supported: EC2 imports RSA and ED25519 keys.", pub.Type())
	}
	kp.publicKey = strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub)))
	if comment != "" {
		kp.publicKey += " " + comment
	}
	return kp, nil
}

func (s *Server) importKeyPair(ctx context.Context, rg *region, q query) (response, error) {
	name := q.str("KeyName")
	switch {
	case name == "":
		return nil, errorf("MissingParameter", "The request must contain the parameter KeyName")
	case len(name) > 255:
		return nil, errorf("InvalidParameterValue", "Value for parameter KeyName is invalid: longer than 255 characters.")
	case q.str("PublicKeyMaterial") == "":
		return nil, errorf("MissingParameter", "The request must contain the parameter PublicKeyMaterial")
	}
	// The query protocol sends the blob base64-encoded.
	material, err := base64.StdEncoding.DecodeString(q.str("PublicKeyMaterial"))
	if err != nil {
		return nil, errorf("InvalidParameterValue", "Value for parameter PublicKeyMaterial is invalid: not base64.")
	}
	kp, err := parseKeyPair(name, material)
	if err != nil {
		return nil, err
	}
	specs, err := q.tagSpecs("key-pair")
	if err != nil {
		return nil, err
	}
	kp.tags = specs["key-pair"]

	s.storageMu.Lock()
	defer s.storageMu.Unlock()
	if s.hasKeyPair(rg, name) {
		return nil, errorf("InvalidKeyPair.Duplicate", "The keypair '%s' already exists.", name)
	}
	if st := s.storage(); st != nil {
		if err := st.ImportKeyPair(ctx, name, material); err != nil {
			return nil, backendError("importing key pair", err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rg.keyPairs[name] = kp
	return &importKeyPairResponse{KeyFingerprint: kp.fingerprint, KeyName: name, KeyPairID: kp.id, Tags: tagsXML(kp.tags)}, nil
}

var keyPairFilters = []string{"key-name", "key-pair-id", "fingerprint", "key-type", "tag-key"}

func (s *Server) describeKeyPairs(_ context.Context, rg *region, q query) (response, error) {
	names := q.list("KeyName")
	ids, err := q.ids("KeyPairId", "key-", "InvalidKeyPair.NotFound")
	if err != nil {
		return nil, err
	}
	withKey, err := q.bool("IncludePublicKey")
	if err != nil {
		return nil, err
	}
	filters, err := q.checkedFilters(keyPairFilters)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range names {
		if rg.keyPairs[n] == nil {
			return nil, errorf("InvalidKeyPair.NotFound", "The key pair '%s' does not exist", n)
		}
	}
	for _, id := range ids {
		if rg.keyPairByID(id) == nil {
			return nil, errorf("InvalidKeyPair.NotFound", "The key pair '%s' does not exist", id)
		}
	}
	resp := &describeKeyPairsResponse{}
	for _, name := range slices.Sorted(maps.Keys(rg.keyPairs)) {
		k := rg.keyPairs[name]
		if len(names) > 0 && !slices.Contains(names, name) || len(ids) > 0 && !slices.Contains(ids, k.id) {
			continue
		}
		values := func(f string) ([]string, bool) {
			switch f {
			case "key-name":
				return []string{k.name}, true
			case "key-pair-id":
				return []string{k.id}, true
			case "fingerprint":
				return []string{k.fingerprint}, true
			case "key-type":
				return []string{k.keyType}, true
			}
			return tagValues(k.tags, f)
		}
		if matchesAll(filters, values) {
			resp.KeyPairs = append(resp.KeyPairs, k.xml(withKey))
		}
	}
	return resp, nil
}

// deleteKeyPair succeeds for a key pair that does not exist, as EC2 does.
func (s *Server) deleteKeyPair(_ context.Context, rg *region, q query) (response, error) {
	name, id := q.str("KeyName"), q.str("KeyPairId")
	if name == "" && id == "" {
		return nil, errorf("MissingParameter", "The request must contain the parameter KeyName or KeyPairId")
	}
	s.storageMu.Lock()
	defer s.storageMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if k := rg.keyPairByID(id); k != nil {
		name = k.name
	}
	delete(rg.keyPairs, name)
	return &returnResponse{Return: true}, nil
}

// ---- volumes ----

// volumeSizes are the sizes, in GiB, EC2 allows for each volume type.
var volumeSizes = map[string][2]int{
	"gp2": {1, 16384}, "gp3": {1, 16384}, "io1": {4, 16384}, "io2": {4, 65536},
	"st1": {125, 16384}, "sc1": {125, 16384}, "standard": {1, 1024},
}

// volumeRequest is a checked CreateVolume.
type volumeRequest struct {
	zone, snapshot, typ, token string
	size                       int
	sized, encrypted           bool
	iops, throughput           int
	tags                       map[string]string
}

func parseCreateVolume(rg *region, q query) (*volumeRequest, error) {
	req := &volumeRequest{zone: q.str("AvailabilityZone"), snapshot: q.str("SnapshotId"), typ: cmp.Or(q.str("VolumeType"), "gp3"), token: q.str("ClientToken")}
	var err error
	if req.zone == "" {
		return nil, errorf("MissingParameter", "The request must contain the parameter AvailabilityZone")
	}
	if !slices.Contains(rg.zones, req.zone) {
		return nil, errorf("InvalidZone.NotFound", "The zone '%s' does not exist.", req.zone)
	}
	if req.size, req.sized, err = q.int("Size"); err != nil {
		return nil, err
	}
	if !req.sized && req.snapshot == "" {
		return nil, errorf("MissingParameter", "The request must contain the parameter size or snapshotId")
	}
	if req.snapshot != "" && !validID(req.snapshot, "snap-") {
		return nil, errorf("InvalidSnapshotID.Malformed", "Invalid id: \"%s\" (expecting \"snap-...\")", req.snapshot)
	}
	if _, ok := volumeSizes[req.typ]; !ok {
		return nil, errorf("InvalidParameterValue", "Value (%s) for parameter volumeType is invalid.", req.typ)
	}
	if len(req.token) > 64 {
		return nil, errorf("InvalidParameterValue", "Value for parameter clientToken is invalid: longer than 64 characters.")
	}
	if req.encrypted, err = q.bool("Encrypted"); err != nil {
		return nil, err
	}
	iops, hasIops, err := q.int("Iops")
	if err != nil {
		return nil, err
	}
	throughput, hasThroughput, err := q.int("Throughput")
	if err != nil {
		return nil, err
	}
	switch req.typ {
	case "gp3":
		req.iops, req.throughput = 3000, 125 // EC2's baseline
		if hasIops {
			if iops < 3000 || iops > 16000 {
				return nil, errorf("InvalidParameterValue", "Volume iops of %d is out of range [3000, 16000] for gp3 volumes.", iops)
			}
			req.iops = iops
		}
		if hasThroughput {
			if throughput < 125 || throughput > 1000 {
				return nil, errorf("InvalidParameterValue", "Volume throughput of %d is out of range [125, 1000] for gp3 volumes.", throughput)
			}
			req.throughput = throughput
		}
	case "io1", "io2":
		if !hasIops {
			return nil, errorf("MissingParameter", "The parameter iops must be specified for %s volumes.", req.typ)
		}
		if iops < 100 {
			return nil, errorf("InvalidParameterValue", "Volume iops of %d is too low; minimum is 100.", iops)
		}
		req.iops = iops
	default:
		if hasIops {
			return nil, errorf("InvalidParameterCombination", "The parameter iops is not supported for %s volumes.", req.typ)
		}
	}
	if hasThroughput && req.typ != "gp3" {
		return nil, errorf("InvalidParameterCombination", "The parameter throughput is not supported for %s volumes.", req.typ)
	}
	specs, err := q.tagSpecs("volume")
	if err != nil {
		return nil, err
	}
	req.tags = specs["volume"]
	return req, nil
}

func checkVolumeSize(typ string, size int) error {
	r := volumeSizes[typ]
	switch {
	case size < r[0]:
		return errorf("InvalidParameterValue", "Volume of %dGiB is too small; minimum is %dGiB.", size, r[0])
	case size > r[1]:
		return errorf("InvalidParameterValue", "Volume of %dGiB is too large for volume type %s; maximum is %dGiB.", size, typ, r[1])
	}
	return nil
}

// createVolume answers creating, as EC2 does; DescribeVolumes shows it
// available after VolumeDelay (and once the backend has it).
func (s *Server) createVolume(ctx context.Context, rg *region, q query) (response, error) {
	req, err := parseCreateVolume(rg, q)
	if err != nil {
		return nil, err
	}
	fp := fingerprint(q)
	s.storageMu.Lock()
	defer s.storageMu.Unlock()
	if err := s.refresh(ctx, rg); err != nil {
		return nil, err
	}

	s.mu.Lock()
	now := time.Now()
	if rec, ok := rg.idempotent["CreateVolume/"+req.token]; ok && req.token != "" {
		defer s.mu.Unlock()
		if rec.fingerprint != fp {
			return nil, errorf("IdempotentParameterMismatch", "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).")
		}
		s.settleVolume(rg, rec.volume, now)
		return &volumeResponse{volumeXML: rec.volume.xml()}, nil
	}
	var fromBackend string
	if req.snapshot != "" {
		sn := rg.snapshots[req.snapshot]
		if sn == nil {
			s.mu.Unlock()
			return nil, errorf("InvalidSnapshot.NotFound", "The snapshot '%s' does not exist.", req.snapshot)
		}
		sn.settle(now)
		if sn.state != cloud.SnapshotCompleted {
			s.mu.Unlock()
			return nil, errorf("IncorrectState", "Snapshot is in invalid state - %s", sn.state)
		}
		switch {
		case !req.sized:
			req.size = sn.size
		case req.size < sn.size:
			s.mu.Unlock()
			return nil, errorf("InvalidParameterValue", "Volume of size %dGB is smaller than snapshot '%s', expect size >= %dGB", req.size, sn.id, sn.size)
		}
		fromBackend = sn.backendID
	}
	s.mu.Unlock()
	if err := checkVolumeSize(req.typ, req.size); err != nil {
		return nil, err
	}
	if req.typ == "gp2" {
		req.iops = min(max(100, 3*req.size), 16000) // gp2's baseline: 3 IOPS a GiB
	}

	v := &volume{
		zone: req.zone, snapshot: req.snapshot, typ: req.typ, size: req.size, iops: req.iops,
		throughput: req.throughput, encrypted: req.encrypted, tags: req.tags,
		state: cloud.VolumeCreating, backendReady: true,
	}
	if st := s.storage(); st != nil {
		// ec2test keeps the ClientToken: one backend serves every region,
		// where tokens of two regions could meet.
		bv, err := st.CreateVolume(ctx, cloud.VolumeSpec{Zone: req.zone, SizeGB: req.size, SnapshotID: fromBackend, Tags: req.tags})
		if err != nil {
			return nil, backendError("creating volume", err)
		}
		v.backendID, v.backendReady = bv.ID, bv.State != cloud.VolumeCreating
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	now = time.Now()
	v.id, v.created, v.readyAt, v.seq = newID("vol-", rg.volumes), now, now.Add(s.opts.VolumeDelay), s.nextSeq()
	rg.volumes[v.id] = v
	if req.token != "" {
		rg.idempotent["CreateVolume/"+req.token] = tokenRecord{fingerprint: fp, volume: v}
	}
	return &volumeResponse{volumeXML: v.xml()}, nil
}

var volumeFilters = []string{
	"volume-id", "status", "availability-zone", "size", "snapshot-id", "volume-type", "encrypted", "tag-key",
	"attachment.instance-id", "attachment.device", "attachment.status",
}

func (v *volume) filterValues(name string) ([]string, bool) {
	switch name {
	case "volume-id":
		return []string{v.id}, true
	case "status":
		return []string{v.status()}, true
	case "availability-zone":
		return []string{v.zone}, true
	case "size":
		return []string{strconv.Itoa(v.size)}, true
	case "snapshot-id":
		return []string{v.snapshot}, true
	case "volume-type":
		return []string{v.typ}, true
	case "encrypted":
		return []string{strconv.FormatBool(v.encrypted)}, true
	case "attachment.instance-id", "attachment.device", "attachment.status":
		if v.attach == nil {
			return nil, false
		}
		return []string{map[string]string{
			"attachment.instance-id": v.attach.instance, "attachment.device": v.attach.device, "attachment.status": v.attach.state,
		}[name]}, true
	}
	return tagValues(v.tags, name)
}

func (s *Server) describeVolumes(ctx context.Context, rg *region, q query) (response, error) {
	ids, err := q.ids("VolumeId", "vol-", "InvalidVolumeID.Malformed")
	if err != nil {
		return nil, err
	}
	filters, err := q.checkedFilters(volumeFilters)
	if err != nil {
		return nil, err
	}
	limit, after, err := q.page(500, len(ids) > 0)
	if err != nil {
		return nil, err
	}
	if err := s.refresh(ctx, rg); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if missing := slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return rg.volumes[id] != nil }); len(missing) > 0 {
		return nil, notFound("InvalidVolume.NotFound", "volume", missing)
	}
	resp := &describeVolumesResponse{}
	var last uint64
	for _, v := range s.volumes(rg, time.Now()) {
		if v.seq <= after || len(ids) > 0 && !slices.Contains(ids, v.id) || !matchesAll(filters, v.filterValues) {
			continue
		}
		if len(resp.Volumes) == limit {
			resp.NextToken = encodeToken(last)
			break
		}
		resp.Volumes = append(resp.Volumes, v.xml())
		last = v.seq
	}
	return resp, nil
}

// notFound words EC2's error for unknown ids: "The volume 'vol-1' does
// not exist." / "The volumes 'vol-1, vol-2' do not exist."
func notFound(code, what string, ids []string) error {
	if len(ids) == 1 {
		return errorf(code, "The %s '%s' does not exist.", what, ids[0])
	}
	return errorf(code, "The %ss '%s' do not exist.", what, strings.Join(ids, ", "))
}

// ebsDevice is a device name EC2 accepts for an EBS volume on Linux.
var ebsDevice = regexp.MustCompile(`^/dev/(sd[a-z]([1-9]|1[0-5])?|xvd[a-z][a-z]?)$`)

// volumeOf finds and settles a volume. Callers hold mu.
func (s *Server) volumeOf(rg *region, id string, now time.Time) (*volume, error) {
	v := rg.volumes[id]
	if v == nil {
		return nil, notFound("InvalidVolume.NotFound", "volume", []string{id})
	}
	s.settleVolume(rg, v, now)
	return v, nil
}

func (s *Server) attachVolume(ctx context.Context, rg *region, q query) (response, error) {
	volID, err := q.id("VolumeId", "vol-", "InvalidVolumeID.Malformed")
	if err != nil {
		return nil, err
	}
	instID, err := q.id("InstanceId", "i-", "InvalidInstanceID.Malformed")
	if err != nil {
		return nil, err
	}
	dev := q.str("Device")
	switch {
	case dev == "":
		return nil, errorf("MissingParameter", "The request must contain the parameter Device")
	case !ebsDevice.MatchString(dev):
		return nil, errorf("InvalidParameterValue", "Value (%s) for parameter device is invalid. %s is not a valid EBS device name.", dev, dev)
	}
	s.storageMu.Lock()
	defer s.storageMu.Unlock()
	if err := s.refresh(ctx, rg); err != nil {
		return nil, err
	}
	s.mu.Lock()
	v, in, err := s.checkAttach(rg, volID, instID, dev, time.Now())
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if st := s.storage(); st != nil {
		if _, err := st.AttachVolume(ctx, v.backendID, in.id, dev); err != nil {
			return nil, backendError("attaching volume", err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	v.attach = &attachment{instance: in.id, device: dev, state: attaching, since: now, readyAt: now.Add(s.opts.VolumeDelay)}
	return &attachmentResponse{attachmentXML: v.attachmentXML()}, nil
}

// checkAttach finds what AttachVolume names and refuses what EC2 refuses.
// Callers hold mu.
func (s *Server) checkAttach(rg *region, volID, instID, dev string, now time.Time) (*volume, *instance, error) {
	v, err := s.volumeOf(rg, volID, now)
	if err != nil {
		return nil, nil, err
	}
	insts, err := s.lookup(rg, []string{instID}, now)
	if err != nil {
		return nil, nil, err
	}
	in := insts[0]
	switch {
	case v.attach != nil:
		return nil, nil, errorf("VolumeInUse", "%s is already attached to an instance", v.id)
	case v.state != cloud.VolumeAvailable:
		return nil, nil, errorf("IncorrectState", "Volume '%s' is not 'available'.", v.id)
	case v.zone != in.zone:
		return nil, nil, errorf("InvalidVolume.ZoneMismatch", "The volume '%s' is not in the same availability zone as instance '%s'", v.id, in.id)
	case in.state != running && in.state != stopped:
		return nil, nil, errorf("IncorrectInstanceState", "Instance '%s' is not 'running'.", in.id)
	}
	taken := dev == in.rootDevice
	for _, o := range s.attachedTo(rg, in.id, now) {
		taken = taken || o.attach.device == dev
	}
	if taken {
		return nil, nil, errorf("InvalidParameterValue", "Invalid value '%s' for unixDevice. Attachment point %s is already in use", dev, dev)
	}
	return v, in, nil
}

func (s *Server) detachVolume(ctx context.Context, rg *region, q query) (response, error) {
	volID, err := q.id("VolumeId", "vol-", "InvalidVolumeID.Malformed")
	if err != nil {
		return nil, err
	}
	instID, dev := q.str("InstanceId"), q.str("Device")
	if instID != "" {
		if err := checkInstanceID(instID); err != nil {
			return nil, err
		}
	}
	force, err := q.bool("Force")
	if err != nil {
		return nil, err
	}
	s.storageMu.Lock()
	defer s.storageMu.Unlock()
	s.mu.Lock()
	v, err := s.volumeOf(rg, volID, time.Now())
	if err == nil {
		switch a := v.attach; {
		case a == nil:
			err = errorf("IncorrectState", "Volume '%s' is in the '%s' state.", v.id, v.status())
		case instID != "" && a.instance != instID || dev != "" && a.device != dev:
			err = errorf("InvalidAttachment.NotFound", "Volume '%s' is not attached to '%s' as '%s'.", v.id, cmp.Or(instID, a.instance), cmp.Or(dev, a.device))
		case a.state == detaching:
			// Asked again while it detaches: nothing more to do.
			defer s.mu.Unlock()
			return &attachmentResponse{attachmentXML: v.attachmentXML()}, nil
		}
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if st := s.storage(); st != nil {
		if _, err := st.DetachVolume(ctx, v.backendID, force); err != nil {
			return nil, backendError("detaching volume", err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	if v.attach == nil { // the instance terminated meanwhile
		return nil, errorf("IncorrectState", "Volume '%s' is in the '%s' state.", v.id, v.status())
	}
	v.attach.state, v.attach.readyAt = detaching, now.Add(s.opts.VolumeDelay)
	return &attachmentResponse{attachmentXML: v.attachmentXML()}, nil
}

func (s *Server) deleteVolume(ctx context.Context, rg *region, q query) (response, error) {
	volID, err := q.id("VolumeId", "vol-", "InvalidVolumeID.Malformed")
	if err != nil {
		return nil, err
	}
	s.storageMu.Lock()
	defer s.storageMu.Unlock()
	s.mu.Lock()
	v, err := s.volumeOf(rg, volID, time.Now())
	if err == nil && v.attach != nil {
		err = errorf("VolumeInUse", "Volume %s is currently attached to %s", v.id, v.attach.instance)
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if st := s.storage(); st != nil {
		if err := st.DeleteVolume(ctx, v.backendID); err != nil {
			return nil, backendError("deleting volume", err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	v.deleted = true
	delete(rg.volumes, v.id)
	return &returnResponse{Return: true}, nil
}

// ---- snapshots ----

func (s *Server) createSnapshot(ctx context.Context, rg *region, q query) (response, error) {
	volID, err := q.id("VolumeId", "vol-", "InvalidVolumeID.Malformed")
	if err != nil {
		return nil, err
	}
	desc := q.str("Description")
	if len(desc) > 255 {
		return nil, errorf("InvalidParameterValue", "Value for parameter Description is invalid: longer than 255 characters.")
	}
	specs, err := q.tagSpecs("snapshot")
	if err != nil {
		return nil, err
	}
	s.storageMu.Lock()
	defer s.storageMu.Unlock()
	if err := s.refresh(ctx, rg); err != nil {
		return nil, err
	}
	s.mu.Lock()
	now := time.Now()
	sn := &snapshot{volumeID: volID, description: desc, tags: specs["snapshot"], state: cloud.SnapshotPending, backendReady: true}
	var backendVol string
	if v := rg.volumes[volID]; v != nil {
		s.settleVolume(rg, v, now)
		if v.state != cloud.VolumeAvailable {
			s.mu.Unlock()
			return nil, errorf("IncorrectState", "The volume '%s' is '%s' and cannot be snapshotted.", v.id, v.status())
		}
		sn.size, sn.encrypted, backendVol = v.size, v.encrypted, v.backendID
	} else if in := s.rootVolumeOf(rg, volID, now); in != nil {
		// An instance's root disk: no data behind it, even with a backend.
		sn.size = in.rootGB
		if sn.size == 0 {
			if im := s.findImage(rg, in.image, now); im != nil {
				sn.size = im.RootVolumeGB
			}
		}
		sn.size = cmp.Or(sn.size, 8)
	} else {
		s.mu.Unlock()
		return nil, notFound("InvalidVolume.NotFound", "volume", []string{volID})
	}
	s.mu.Unlock()

	if st := s.storage(); st != nil && backendVol != "" {
		bs, err := st.CreateSnapshot(ctx, backendVol, desc, sn.tags)
		if err != nil {
			return nil, backendError("creating snapshot", err)
		}
		sn.backendID, sn.backendReady = bs.ID, bs.State == cloud.SnapshotCompleted
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.addSnapshot(rg, sn, time.Now())
	return &snapshotResponse{snapshotXML: sn.xml(s.opts.Account, time.Now())}, nil
}

// addSnapshot records a new pending snapshot. Callers hold mu.
func (s *Server) addSnapshot(rg *region, sn *snapshot, now time.Time) {
	sn.id, sn.started, sn.readyAt, sn.seq = newID("snap-", rg.snapshots), now, now.Add(s.opts.SnapshotDelay), s.nextSeq()
	rg.snapshots[sn.id] = sn
}

var snapshotFilters = []string{"snapshot-id", "volume-id", "status", "description", "owner-id", "progress", "volume-size", "encrypted", "tag-key"}

func (s *Server) describeSnapshots(ctx context.Context, rg *region, q query) (response, error) {
	ids, err := q.ids("SnapshotId", "snap-", "InvalidSnapshotID.Malformed")
	if err != nil {
		return nil, err
	}
	owners := q.list("Owner")
	for i, o := range owners {
		if o == "self" {
			owners[i] = s.opts.Account
		}
	}
	filters, err := q.checkedFilters(snapshotFilters)
	if err != nil {
		return nil, err
	}
	limit, after, err := q.page(1000, len(ids) > 0)
	if err != nil {
		return nil, err
	}
	if err := s.refresh(ctx, rg); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if missing := slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return rg.snapshots[id] != nil }); len(missing) > 0 {
		return nil, notFound("InvalidSnapshot.NotFound", "snapshot", missing)
	}
	now := time.Now()
	resp := &describeSnapshotsResponse{}
	var last uint64
	for _, sn := range rg.orderedSnapshots(now) {
		x := sn.xml(s.opts.Account, now)
		values := func(name string) ([]string, bool) {
			switch name {
			case "snapshot-id":
				return []string{x.SnapshotID}, true
			case "volume-id":
				return []string{x.VolumeID}, true
			case "status":
				return []string{x.Status}, true
			case "description":
				return []string{x.Description}, true
			case "owner-id":
				return []string{x.OwnerID}, true
			case "progress":
				return []string{x.Progress}, true
			case "volume-size":
				return []string{strconv.Itoa(x.VolumeSize)}, true
			case "encrypted":
				return []string{strconv.FormatBool(x.Encrypted)}, true
			}
			return tagValues(sn.tags, name)
		}
		if sn.seq <= after || len(ids) > 0 && !slices.Contains(ids, sn.id) ||
			len(owners) > 0 && !slices.Contains(owners, s.opts.Account) || !matchesAll(filters, values) {
			continue
		}
		if len(resp.Snapshots) == limit {
			resp.NextToken = encodeToken(last)
			break
		}
		resp.Snapshots = append(resp.Snapshots, x)
		last = sn.seq
	}
	return resp, nil
}

func (s *Server) deleteSnapshot(ctx context.Context, rg *region, q query) (response, error) {
	id, err := q.id("SnapshotId", "snap-", "InvalidSnapshotID.Malformed")
	if err != nil {
		return nil, err
	}
	s.storageMu.Lock()
	defer s.storageMu.Unlock()
	s.mu.Lock()
	sn := rg.snapshots[id]
	if sn == nil {
		s.mu.Unlock()
		return nil, notFound("InvalidSnapshot.NotFound", "snapshot", []string{id})
	}
	for _, im := range rg.images {
		if slices.ContainsFunc(im.Devices, func(d ImageDevice) bool { return d.SnapshotID == id }) {
			s.mu.Unlock()
			return nil, errorf("InvalidSnapshot.InUse", "The snapshot %s is currently in use by %s", id, im.ID)
		}
	}
	s.mu.Unlock()
	if st := s.storage(); st != nil && sn.backendID != "" {
		if err := st.DeleteSnapshot(ctx, sn.backendID); err != nil {
			return nil, backendError("deleting snapshot", err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(rg.snapshots, id)
	return &returnResponse{Return: true}, nil
}

// sourceRegion reads SourceRegion, which must be a region served.
func (s *Server) sourceRegion(q query) (*region, error) {
	name := q.str("SourceRegion")
	if name == "" {
		return nil, errorf("MissingParameter", "The request must contain the parameter SourceRegion")
	}
	src := s.regions[name]
	if src == nil {
		return nil, errorf("InvalidParameterValue", "Invalid value '%s' for SourceRegion: ec2test serves %s.", name, strings.Join(s.opts.Regions, ", "))
	}
	return src, nil
}

// copySnapshot copies a completed snapshot of any region served into the
// request's region.
func (s *Server) copySnapshot(ctx context.Context, rg *region, q query) (response, error) {
	src, err := s.sourceRegion(q)
	if err != nil {
		return nil, err
	}
	srcID, err := q.id("SourceSnapshotId", "snap-", "InvalidSnapshotID.Malformed")
	if err != nil {
		return nil, err
	}
	if dst := q.str("DestinationRegion"); dst != "" && dst != rg.name {
		return nil, errorf("InvalidParameterValue", "DestinationRegion %s is not the region of the request, %s.", dst, rg.name)
	}
	encrypted, err := q.bool("Encrypted")
	if err != nil {
		return nil, err
	}
	desc := cmp.Or(q.str("Description"), fmt.Sprintf("[Copied %s from %s]", srcID, src.name))
	specs, err := q.tagSpecs("snapshot")
	if err != nil {
		return nil, err
	}
	s.storageMu.Lock()
	defer s.storageMu.Unlock()
	if err := s.refresh(ctx, src); err != nil {
		return nil, err
	}
	s.mu.Lock()
	from := src.snapshots[srcID]
	if from == nil {
		s.mu.Unlock()
		return nil, notFound("InvalidSnapshot.NotFound", "snapshot", []string{srcID})
	}
	from.settle(time.Now())
	if from.state != cloud.SnapshotCompleted {
		s.mu.Unlock()
		return nil, errorf("IncorrectState", "Snapshot is in invalid state - %s", from.state)
	}
	sn := &snapshot{
		volumeID: copiedVolumeID, description: desc, size: from.size, encrypted: from.encrypted || encrypted,
		tags: specs["snapshot"], state: cloud.SnapshotPending, backendReady: true,
	}
	fromBackend := from.backendID
	s.mu.Unlock()
	if err := s.backendCopy(ctx, sn, fromBackend); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.addSnapshot(rg, sn, time.Now())
	return &copySnapshotResponse{SnapshotID: sn.id, Tags: tagsXML(sn.tags)}, nil
}

// backendCopy copies the backend snapshot behind a copy, inside the
// backend's own region (see the top of this file).
func (s *Server) backendCopy(ctx context.Context, sn *snapshot, fromBackend string) error {
	st := s.storage()
	if st == nil || fromBackend == "" {
		return nil
	}
	bs, err := st.CopySnapshot(ctx, st.Region(), fromBackend, sn.description, sn.tags)
	if err != nil {
		return backendError("copying snapshot", err)
	}
	sn.backendID, sn.backendReady = bs.ID, bs.State == cloud.SnapshotCompleted
	return nil
}

// tagValues answers the tag:KEY and tag-key filters from tags.
func tagValues(tags map[string]string, name string) ([]string, bool) {
	if k, ok := strings.CutPrefix(name, "tag:"); ok {
		v, ok := tags[k]
		return []string{v}, ok
	}
	if name == "tag-key" {
		return slices.Collect(maps.Keys(tags)), true
	}
	return nil, false
}
