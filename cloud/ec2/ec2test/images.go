package ec2test

// This file holds CreateImage, RegisterImage, CopyImage, DeregisterImage
// and DescribeImages; storage.go says what reaches a storage backend.

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// amiName is what EC2 allows in an image name.
var amiName = regexp.MustCompile(`^[a-zA-Z0-9()\[\] ./\-'@_]{3,128}$`)

func checkImageName(q query) (string, error) {
	name := q.str("Name")
	switch {
	case name == "":
		return "", errorf("MissingParameter", "The request must contain the parameter Name")
	case !amiName.MatchString(name):
		return "", errorf("InvalidAMIName.Malformed", "AMI names must be between 3 and 128 characters long, and may contain letters, numbers, '(', ')', '.', '-', '/' and '_'")
	case len(q.str("Description")) > 255:
		return "", errorf("InvalidParameterValue", "Value for parameter Description is invalid: longer than 255 characters.")
	}
	return name, nil
}

func (s *Server) duplicateName(rg *region, name string) error {
	if o := s.imageByName(rg, name); o != nil {
		return errorf("InvalidAMIName.Duplicate", "AMI name %s is already in use by AMI %s", name, o.ID)
	}
	return nil
}

// newImageID makes an image id the region does not have. Callers hold mu.
func newImageID(rg *region) string {
	taken := map[string]bool{}
	for _, o := range rg.images {
		taken[o.ID] = true
	}
	return newID("ami-", taken)
}

// addImage records a new pending image, with a new id unless it has one.
// Callers hold mu.
func (s *Server) addImage(rg *region, im Image, now time.Time) string {
	if im.ID == "" {
		im.ID = newImageID(rg)
	}
	if im.backendID == "" {
		im.backendReady = true
	}
	im.Owner, im.Created, im.State, im.readyAt = s.opts.Account, now, cloud.ImagePending, now.Add(s.opts.ImageDelay)
	for _, d := range im.Devices {
		if d.Device == im.RootDevice {
			im.RootVolumeGB = d.SizeGB
		}
	}
	rg.images = append(rg.images, im)
	return im.ID
}

// createImage images a running or stopped instance: a snapshot of its
// root disk and of every volume attached to it. NoReboot is accepted;
// nothing reboots here either way.
func (s *Server) createImage(ctx context.Context, rg *region, q query) (response, error) {
	instID, err := q.id("InstanceId", "i-", "InvalidInstanceID.Malformed")
	if err != nil {
		return nil, err
	}
	name, err := checkImageName(q)
	if err != nil {
		return nil, err
	}
	if _, err := q.bool("NoReboot"); err != nil {
		return nil, err
	}
	specs, err := q.tagSpecs("image", "snapshot")
	if err != nil {
		return nil, err
	}
	s.storageMu.Lock()
	defer s.storageMu.Unlock()
	s.mu.Lock()
	now := time.Now()
	insts, err := s.lookup(rg, []string{instID}, now)
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	in := insts[0]
	if in.state != running && in.state != stopped {
		s.mu.Unlock()
		return nil, errorf("IncorrectInstanceState", "The instance '%s' is not in a state from which it can be imaged.", in.id)
	}
	if err := s.duplicateName(rg, name); err != nil {
		s.mu.Unlock()
		return nil, err
	}
	im := Image{
		Name: name, Description: q.str("Description"), Architecture: "x86_64", RootDevice: in.rootDevice,
		Tags: specs["image"], virtualization: "hvm", ena: true,
	}
	rootGB := in.rootGB
	if from := s.findImage(rg, in.image, now); from != nil {
		im.Architecture, im.virtualization, im.ena, im.bootMode = from.Architecture, from.virtualization, from.ena, from.bootMode
		rootGB = cmp.Or(rootGB, from.RootVolumeGB)
	}
	type disk struct {
		device, volumeID, backendID string
		size                        int
		encrypted                   bool
	}
	disks := []disk{{device: in.rootDevice, volumeID: in.volumeID, size: cmp.Or(rootGB, 8)}}
	for _, v := range s.attachedTo(rg, in.id, now) {
		disks = append(disks, disk{v.attach.device, v.id, v.backendID, v.size, v.encrypted})
	}
	// EC2 names the new image in its snapshots' descriptions.
	im.ID = newImageID(rg)
	s.mu.Unlock()

	var snaps []*snapshot
	for _, d := range disks {
		snaps = append(snaps, &snapshot{
			volumeID: d.volumeID, size: d.size, encrypted: d.encrypted, tags: maps.Clone(specs["snapshot"]),
			description: fmt.Sprintf("Created by CreateImage(%s) for %s", in.id, im.ID), state: cloud.SnapshotPending, backendReady: true,
		})
	}
	if st := s.storage(); st != nil {
		// The backend images the root disk, whose data only it has; the
		// attached volumes are snapshotted one by one, as EC2 includes them.
		bi, err := st.CreateImage(ctx, in.id, cloud.ImageSpec{Name: im.ID, Description: name, Architecture: im.Architecture, Tags: im.Tags})
		if err != nil {
			return nil, backendError("creating image", err)
		}
		im.backendID, im.backendReady = bi.ID, bi.State == cloud.ImageAvailable
		for _, d := range bi.Devices {
			if d.Device == bi.RootDevice {
				snaps[0].backendID, snaps[0].backendReady = d.SnapshotID, false // refresh asks
			}
		}
		for i, d := range disks[1:] {
			bs, err := st.CreateSnapshot(ctx, d.backendID, snaps[i+1].description, snaps[i+1].tags)
			if err != nil {
				return nil, backendError("creating snapshot", err)
			}
			snaps[i+1].backendID, snaps[i+1].backendReady = bs.ID, bs.State == cloud.SnapshotCompleted
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now = time.Now()
	for i, sn := range snaps {
		s.addSnapshot(rg, sn, now)
		im.Devices = append(im.Devices, ImageDevice{Device: disks[i].device, SnapshotID: sn.id, SizeGB: sn.size, VolumeType: "gp3", DeleteOnTermination: i == 0})
	}
	return &imageIDResponse{ImageID: s.addImage(rg, im, now)}, nil
}

var (
	architectures  = []string{"i386", "x86_64", "arm64", "x86_64_mac", "arm64_mac"}
	bootModes      = []string{"legacy-bios", "uefi", "uefi-preferred"}
	virtualization = []string{"hvm", "paravirtual"}
)

// registerImage registers an EBS-backed image from snapshots of the
// region. Like EC2 it defaults to paravirtual, which modern instance
// types do not boot: a client should ask for hvm.
func (s *Server) registerImage(ctx context.Context, rg *region, q query) (response, error) {
	name, err := checkImageName(q)
	if err != nil {
		return nil, err
	}
	im := Image{
		Name: name, Description: q.str("Description"), RootDevice: q.str("RootDeviceName"),
		Architecture: cmp.Or(q.str("Architecture"), "x86_64"), virtualization: cmp.Or(q.str("VirtualizationType"), "paravirtual"),
		bootMode: q.str("BootMode"), imdsSupport: q.str("ImdsSupport"),
	}
	for _, c := range []struct {
		name, value string
		allowed     []string
	}{
		{"Architecture", im.Architecture, architectures},
		{"VirtualizationType", im.virtualization, virtualization},
		{"BootMode", cmp.Or(im.bootMode, "uefi"), bootModes},
		{"ImdsSupport", cmp.Or(im.imdsSupport, "v2.0"), []string{"v2.0"}},
	} {
		if !slices.Contains(c.allowed, c.value) {
			return nil, errorf("InvalidParameterValue", "Value (%s) for parameter %s is invalid.", c.value, c.name)
		}
	}
	if im.ena, err = q.bool("EnaSupport"); err != nil {
		return nil, err
	}
	if im.RootDevice == "" {
		return nil, errorf("MissingParameter", "The request must contain the parameter RootDeviceName")
	}
	if im.Devices, err = parseImageDevices(q, im.RootDevice); err != nil {
		return nil, err
	}
	specs, err := q.tagSpecs("image")
	if err != nil {
		return nil, err
	}
	im.Tags = specs["image"]
	s.storageMu.Lock()
	defer s.storageMu.Unlock()
	if err := s.refresh(ctx, rg); err != nil {
		return nil, err
	}
	backendSnaps := map[string]string{}
	s.mu.Lock()
	err = s.checkRegister(rg, &im, backendSnaps, time.Now())
	im.ID = newImageID(rg)
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if err := s.registerInBackend(ctx, &im, backendSnaps); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return &imageIDResponse{ImageID: s.addImage(rg, im, time.Now())}, nil
}

// checkRegister checks an image's name and snapshots, fills in the
// devices' sizes, and notes the backend's snapshot for each device.
// Callers hold mu.
func (s *Server) checkRegister(rg *region, im *Image, backendSnaps map[string]string, now time.Time) error {
	if err := s.duplicateName(rg, im.Name); err != nil {
		return err
	}
	for i := range im.Devices {
		d := &im.Devices[i]
		if d.SnapshotID == "" {
			continue
		}
		sn := rg.snapshots[d.SnapshotID]
		if sn == nil {
			return notFound("InvalidSnapshot.NotFound", "snapshot", []string{d.SnapshotID})
		}
		sn.settle(now)
		switch {
		case sn.state != cloud.SnapshotCompleted:
			return errorf("IncorrectState", "Snapshot %s is not in the 'completed' state (%s).", sn.id, sn.state)
		case d.SizeGB == 0:
			d.SizeGB = sn.size
		case d.SizeGB < sn.size:
			return errorf("InvalidBlockDeviceMapping", "Volume of size %dGB is smaller than snapshot '%s', expect size >= %dGB", d.SizeGB, sn.id, sn.size)
		}
		backendSnaps[d.Device] = sn.backendID
	}
	return nil
}

// parseImageDevices reads RegisterImage's BlockDeviceMapping.N: the root
// device must be among them, from a snapshot.
func parseImageDevices(q query, root string) ([]ImageDevice, error) {
	var out []ImageDevice
	for _, i := range q.indexes("BlockDeviceMapping") {
		p := "BlockDeviceMapping." + strconv.Itoa(i)
		d := ImageDevice{Device: q.str(p + ".DeviceName"), SnapshotID: q.str(p + ".Ebs.SnapshotId"), VolumeType: cmp.Or(q.str(p+".Ebs.VolumeType"), "gp2"), DeleteOnTermination: true}
		switch {
		case d.Device == "":
			return nil, errorf("MissingParameter", "The request must contain the parameter %s.DeviceName", p)
		case !ebsDevice.MatchString(d.Device):
			return nil, errorf("InvalidBlockDeviceMapping", "Invalid device name %s", d.Device)
		case slices.ContainsFunc(out, func(o ImageDevice) bool { return o.Device == d.Device }):
			return nil, errorf("InvalidBlockDeviceMapping", "The device '%s' is used in more than one block-device mapping", d.Device)
		case d.SnapshotID != "" && !validID(d.SnapshotID, "snap-"):
			return nil, errorf("InvalidSnapshotID.Malformed", "Invalid id: \"%s\" (expecting \"snap-...\")", d.SnapshotID)
		}
		if _, ok := volumeSizes[d.VolumeType]; !ok {
			return nil, errorf("InvalidParameterValue", "Value (%s) for parameter volumeType is invalid.", d.VolumeType)
		}
		size, sized, err := q.int(p + ".Ebs.VolumeSize")
		if err != nil {
			return nil, err
		}
		if sized {
			if err := checkVolumeSize(d.VolumeType, size); err != nil {
				return nil, err
			}
			d.SizeGB = size
		}
		if d.SnapshotID == "" && !sized {
			return nil, errorf("InvalidBlockDeviceMapping", "The device %s needs a snapshot or a volume size", d.Device)
		}
		if q.has(p + ".Ebs.DeleteOnTermination") {
			if d.DeleteOnTermination, err = q.bool(p + ".Ebs.DeleteOnTermination"); err != nil {
				return nil, err
			}
		}
		out = append(out, d)
	}
	if len(out) == 0 {
		return nil, errorf("MissingParameter", "The request must contain the parameter BlockDeviceMapping (ec2test registers EBS-backed images only)")
	}
	if !slices.ContainsFunc(out, func(d ImageDevice) bool { return d.Device == root && d.SnapshotID != "" }) {
		return nil, errorf("InvalidBlockDeviceMapping", "The root device %s must be mapped to a snapshot", root)
	}
	return out, nil
}

// copyImage copies an available image of any region served into the
// request's region, its snapshots too, with new ids.
func (s *Server) copyImage(ctx context.Context, rg *region, q query) (response, error) {
	src, err := s.sourceRegion(q)
	if err != nil {
		return nil, err
	}
	srcID, err := q.id("SourceImageId", "ami-", "InvalidAMIID.Malformed")
	if err != nil {
		return nil, err
	}
	name, err := checkImageName(q)
	if err != nil {
		return nil, err
	}
	token := q.str("ClientToken")
	if len(token) > 64 {
		return nil, errorf("InvalidParameterValue", "Value for parameter clientToken is invalid: longer than 64 characters.")
	}
	copyTags, err := q.bool("CopyImageTags")
	if err != nil {
		return nil, err
	}
	encrypted, err := q.bool("Encrypted")
	if err != nil {
		return nil, err
	}
	specs, err := q.tagSpecs("image", "snapshot")
	if err != nil {
		return nil, err
	}
	fp := fingerprint(q)
	s.storageMu.Lock()
	defer s.storageMu.Unlock()
	if err := s.refresh(ctx, src); err != nil {
		return nil, err
	}
	s.mu.Lock()
	now := time.Now()
	if rec, ok := rg.idempotent["CopyImage/"+token]; ok && token != "" {
		s.mu.Unlock()
		if rec.fingerprint != fp {
			return nil, errorf("IdempotentParameterMismatch", "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).")
		}
		return &imageIDResponse{ImageID: rec.imageID}, nil
	}
	from := s.findImage(src, srcID, now)
	var err2 error
	switch {
	case from == nil:
		err2 = errorf("InvalidAMIID.NotFound", "The image id '[%s]' does not exist", srcID)
	case from.State != cloud.ImageAvailable:
		err2 = errorf("IncorrectState", "Image %s is not in a valid state: %s", srcID, from.State)
	default:
		err2 = s.duplicateName(rg, name)
	}
	if err2 != nil {
		s.mu.Unlock()
		return nil, err2
	}
	im := *from
	im.ID, im.Name, im.Description, im.Devices, im.Tags = newImageID(rg), name, q.str("Description"), slices.Clone(from.Devices), map[string]string{}
	im.backendID, im.backendReady = "", false
	if copyTags {
		maps.Copy(im.Tags, from.Tags)
	}
	maps.Copy(im.Tags, specs["image"])
	var snaps []*snapshot
	var fromBackend []string
	for _, d := range im.Devices {
		sn := &snapshot{
			volumeID: copiedVolumeID, size: d.SizeGB, encrypted: encrypted, tags: maps.Clone(specs["snapshot"]),
			description: fmt.Sprintf("Copied for DestinationAmi %s from SourceAmi %s for SourceSnapshot %s", im.ID, srcID, d.SnapshotID),
			state:       cloud.SnapshotPending, backendReady: true,
		}
		b := ""
		if o := src.snapshots[d.SnapshotID]; o != nil {
			sn.size, sn.encrypted, b = o.size, o.encrypted || encrypted, o.backendID
		}
		snaps, fromBackend = append(snaps, sn), append(fromBackend, b)
	}
	s.mu.Unlock()
	backendSnaps := map[string]string{}
	for i, sn := range snaps {
		if err := s.backendCopy(ctx, sn, fromBackend[i]); err != nil {
			return nil, err
		}
		backendSnaps[im.Devices[i].Device] = sn.backendID
	}
	if err := s.registerInBackend(ctx, &im, backendSnaps); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now = time.Now()
	for i, sn := range snaps {
		s.addSnapshot(rg, sn, now)
		im.Devices[i].SnapshotID = sn.id
	}
	id := s.addImage(rg, im, now)
	if token != "" {
		rg.idempotent["CopyImage/"+token] = tokenRecord{fingerprint: fp, imageID: id}
	}
	return &imageIDResponse{ImageID: id}, nil
}

// deregisterImage removes an image, not its snapshots.
func (s *Server) deregisterImage(ctx context.Context, rg *region, q query) (response, error) {
	id, err := q.id("ImageId", "ami-", "InvalidAMIID.Malformed")
	if err != nil {
		return nil, err
	}
	s.storageMu.Lock()
	defer s.storageMu.Unlock()
	s.mu.Lock()
	im := s.findImage(rg, id, time.Now())
	var backendID string
	if im != nil {
		backendID = im.backendID
	}
	s.mu.Unlock()
	if im == nil {
		return nil, errorf("InvalidAMIID.NotFound", "The image id '[%s]' does not exist", id)
	}
	if st := s.storage(); st != nil && backendID != "" {
		if err := st.DeregisterImage(ctx, backendID); err != nil {
			return nil, backendError("deregistering image", err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rg.images = slices.DeleteFunc(rg.images, func(im Image) bool { return im.ID == id })
	return &returnResponse{Return: true}, nil
}

var imageFilters = []string{
	"name", "state", "image-id", "owner-id", "architecture", "description", "virtualization-type",
	"root-device-name", "block-device-mapping.snapshot-id", "tag-key",
}

func (s *Server) describeImages(ctx context.Context, rg *region, q query) (response, error) {
	ids, err := q.ids("ImageId", "ami-", "InvalidAMIID.Malformed")
	if err != nil {
		return nil, err
	}
	if _, err := q.bool("IncludeDeprecated"); err != nil {
		return nil, err
	}
	owners := q.list("Owner")
	for i, o := range owners {
		if o == "self" {
			owners[i] = s.opts.Account
		}
	}
	filters, err := q.checkedFilters(imageFilters)
	if err != nil {
		return nil, err
	}
	// Images wait for their snapshots, which the backend may still make.
	if err := s.refresh(ctx, rg); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	var missing []string
	for _, id := range ids {
		if s.findImage(rg, id, now) == nil {
			missing = append(missing, id)
		}
	}
	if len(missing) > 0 {
		return nil, errorf("InvalidAMIID.NotFound", "The image id '[%s]' does not exist", strings.Join(missing, ", "))
	}
	resp := &describeImagesResponse{}
	for i := range rg.images {
		im := &rg.images[i]
		s.settleImage(rg, im, now)
		if len(ids) > 0 && !slices.Contains(ids, im.ID) || len(owners) > 0 && !slices.Contains(owners, im.Owner) {
			continue
		}
		values := func(name string) ([]string, bool) {
			switch name {
			case "name":
				return []string{im.Name}, true
			case "state":
				return []string{im.State}, true
			case "image-id":
				return []string{im.ID}, true
			case "owner-id":
				return []string{im.Owner}, true
			case "architecture":
				return []string{im.Architecture}, true
			case "description":
				return []string{im.Description}, true
			case "virtualization-type":
				return []string{im.virtualization}, true
			case "root-device-name":
				return []string{im.RootDevice}, true
			case "block-device-mapping.snapshot-id":
				var out []string
				for _, d := range im.Devices {
					out = append(out, d.SnapshotID)
				}
				return out, true
			}
			return tagValues(im.Tags, name)
		}
		if matchesAll(filters, values) {
			resp.Images = append(resp.Images, imageToXML(im))
		}
	}
	return resp, nil
}
