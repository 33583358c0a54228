// calls.js owns the web client's WebRTC: the 1v1 call (call / call_incoming / accept /
// reject / hangup, mute, camera off, the call timer's start), the small-class mesh (av_join,
// av_peer: one RTCPeerConnection per call or per A/V peer, trickle ICE through `signal`,
// remote candidates held until the remote description is set, the approach of
// tests/browser/page/studyhall-rtc.js) and the SFU (av_join answering `mode:"sfu"`: ONE
// RTCPeerConnection to the server, `signal {room, to:"sfu"}`, the server's renegotiation
// offers answered with the client as the impolite side, remote tracks grouped per publisher
// by their stream id, `active_speakers`, `av_muted`, `av_unmuted`, stage changes in live rooms). No DOM
// beyond the <video> elements it is handed.

export class Peer {
  constructor(key, iceServers, send, onTrack, onState) {
    this.key = key;
    this.send = send;
    this.pc = new RTCPeerConnection({ iceServers: iceServers || [] });
    this.held = [];
    this.chain = Promise.resolve();
    this.tracksAdded = false;
    this.pc.onicecandidate = (e) => this.send({ candidate: e.candidate ? e.candidate.toJSON() : null });
    this.pc.ontrack = (e) => onTrack(e.streams[0] || new MediaStream([e.track]));
    this.pc.onconnectionstatechange = () => onState(this.pc.connectionState);
  }

  addTracks(stream) {
    if (this.tracksAdded || !stream) return;
    this.tracksAdded = true;
    for (const t of stream.getTracks()) this.pc.addTrack(t, stream);
  }

  async offer() {
    const o = await this.pc.createOffer();
    await this.pc.setLocalDescription(o);
    this.send({ sdp: { type: o.type, sdp: o.sdp } });
  }

  handle(data, stream) {
    this.chain = this.chain.then(() => this.apply(data, stream)).catch((e) => console.warn(this.key, 'signal', e));
  }

  async apply(data, stream) {
    if (data.sdp) {
      await this.pc.setRemoteDescription(data.sdp);
      for (const c of this.held.splice(0)) await this.addCandidate(c);
      if (data.sdp.type === 'offer') {
        this.addTracks(stream);
        const a = await this.pc.createAnswer();
        await this.pc.setLocalDescription(a);
        this.send({ sdp: { type: a.type, sdp: a.sdp } });
      }
    } else if ('candidate' in data) {
      if (!this.pc.remoteDescription) this.held.push(data.candidate);
      else await this.addCandidate(data.candidate);
    }
  }

  async addCandidate(c) {
    if (c && c.candidate) await this.pc.addIceCandidate(c);
    else await this.pc.addIceCandidate();
  }

  close() {
    this.pc.close();
  }
}

/// The `to` of a signal for the server itself, and the `from.session` of its signals.
const SFU_PEER = 'sfu';
// The camera's simulcast layers on the SFU: a quarter, half and full size, slowest first.
const SIMULCAST_LAYERS = [
  { rid: 'l', scaleResolutionDownBy: 4, maxBitrate: 150_000 },
  { rid: 'm', scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: 'h', scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
];

/// Calls and A/V for one signed-in client. `ui` gets callbacks: onCall(state), onAv(state).
export class Calls {
  constructor(client, ui) {
    this.client = client;
    this.ui = ui;
    this.local = null;
    this.call = null; // {id, peerUser, peerName, state, startedAt, incoming, peer, media}
    this.early = new Map(); // key -> [signal data] before the peer existed
    // Mesh: {room, mode:'mesh', peers: Map(session -> {peer, user, stream, state})}.
    // SFU: {room, mode:'sfu', peers: Map(user -> {user, stream, state}) (the tiles shown),
    // users: Map(user -> {user, stream, state}) (every publisher heard), sessions:
    // Map(session -> user), offStage: Set(user), speakers: Set(user), sfu: {pc, ...}}.
    this.av = null;
    // The camera asked for; a page (or a test) may lower it before joining.
    this.videoConstraints = { width: 640, height: 480 };
    // The microphone asked for (the browser's echo cancellation, noise suppression and gain
    // control by default); a page (or a test) may change it before joining.
    this.audioConstraints = true;
    client.on('call_incoming', (m) => this.onIncoming(m));
    client.on('call_state', (m) => this.onCallState(m));
    client.on('call_ended', (m) => this.onEnded(m));
    client.on('signal', (m) => this.onSignal(m));
    client.on('av_peer', (m) => this.onAvPeer(m));
    client.on('active_speakers', (m) => this.onSpeakers(m));
    client.on('av_muted', (m) => this.onAvMuted(m));
    client.on('av_unmuted', (m) => this.onAvUnmuted(m));
    client.on('stage', (m) => this.onStage(m));
    client.on('kicked', (m) => this.onKicked(m));
    client.on('av_closed', (m) => this.onAvClosed(m));
  }

  async media(kinds = { audio: true, video: true }) {
    if (this.local) return this.local;
    const video = kinds.video ? this.videoConstraints : false;
    const audio = kinds.audio ? this.audioConstraints : false;
    this.local = await navigator.mediaDevices.getUserMedia({ audio, video });
    return this.local;
  }

  stopMedia() {
    if (this.local && !this.call && !this.av) {
      for (const t of this.local.getTracks()) t.stop();
      this.local = null;
    }
  }

  changed() {
    this.ui.onCall(this.call);
  }

  signalSender(cmd) {
    return (data) => {
      this.client.request({ ...cmd, data }).catch((e) => console.warn('signal refused', e.code, e.detail));
    };
  }

  // -- 1v1 ---------------------------------------------------------------------------------

  async place(to, name) {
    if (this.call) throw new Error('already in a call');
    await this.media();
    this.call = { id: null, peerUser: to, peerName: name || to, state: 'calling', outgoing: true };
    this.changed();
    try {
      const ok = await this.client.request({ type: 'call', to, media: { audio: true, video: true } });
      this.call.id = ok.call_id;
      this.call.ice = ok.ice_servers;
      if (this.call.state === 'accepted') await this.startOffer();
    } catch (e) {
      this.call = null;
      this.stopMedia();
      this.changed();
      throw e;
    }
  }

  onIncoming(m) {
    if (this.call) return; // the server makes the caller busy unless call waiting is on
    this.call = {
      id: m.call_id, peerUser: m.from.user, peerName: m.from.name || m.from.user, state: 'ringing',
      incoming: m, outgoing: false,
    };
    this.changed();
  }

  async accept() {
    const c = this.call;
    if (!c || c.state !== 'ringing') return;
    await this.media();
    const ok = await this.client.request({ type: 'call_accept', call_id: c.id });
    c.ice = ok.ice_servers;
    this.makeCallPeer();
  }

  async reject() {
    if (!this.call) return;
    await this.client.request({ type: 'call_reject', call_id: this.call.id }).catch(() => {});
  }

  async hangup() {
    const c = this.call;
    if (!c) return;
    if (c.id) await this.client.request({ type: 'call_hangup', call_id: c.id }).catch(() => {});
    if (this.call === c) this.teardown('ended');
  }

  makeCallPeer() {
    const c = this.call;
    const id = c.id;
    c.peer = new Peer(id, c.ice, this.signalSender({ type: 'signal', call_id: id }),
      (stream) => {
        c.remote = stream;
        this.changed();
      },
      (state) => {
        c.pcState = state;
        this.changed();
      });
    for (const d of this.early.get(id) || []) c.peer.handle(d, this.local);
    this.early.delete(id);
    return c.peer;
  }

  async startOffer() {
    const p = this.makeCallPeer();
    p.addTracks(this.local);
    await p.offer();
  }

  onCallState(m) {
    const c = this.call;
    if (!c || (c.id && c.id !== m.call_id)) return;
    if (m.state === 'accepted') {
      c.state = 'accepted';
      c.startedAt = Date.now();
      if (c.outgoing && c.id) this.startOffer();
    } else if (m.state === 'answered_elsewhere') {
      this.teardown('answered elsewhere');
      return;
    } else {
      c.state = m.state;
    }
    this.changed();
  }

  onEnded(m) {
    if (this.call && this.call.id === m.call_id) this.teardown(m.reason);
  }

  teardown(reason) {
    const c = this.call;
    if (!c) return;
    if (c.peer) c.peer.close();
    this.call = null;
    this.stopMedia();
    this.ui.onCall(null, reason);
  }

  setMic(on) {
    for (const t of (this.local && this.local.getAudioTracks()) || []) t.enabled = on;
  }

  setCamera(on) {
    for (const t of (this.local && this.local.getVideoTracks()) || []) t.enabled = on;
  }

  onSignal(m) {
    if (m.call_id) {
      const c = this.call;
      if (c && c.id === m.call_id && c.peer) c.peer.handle(m.data, this.local);
      else {
        if (!this.early.has(m.call_id)) this.early.set(m.call_id, []);
        this.early.get(m.call_id).push(m.data);
      }
      return;
    }
    if (!this.av || this.av.room !== m.room) return;
    if (this.av.mode === 'sfu') {
      if (m.from.session === SFU_PEER) this.sfuQueue(() => this.sfuApply(m.data));
      return;
    }
    let p = this.av.peers.get(m.from.session);
    if (!p) p = this.addAvPeer(m.from.session, m.from.user);
    p.peer.handle(m.data, this.av.publish ? this.local : null);
  }

  // -- small-class mesh --------------------------------------------------------------------

  async avJoin(room) {
    if (this.av) return;
    // The SFU can do without a camera (recvonly); the mesh cannot, as before.
    let mediaError = null;
    await this.media().catch((e) => {
      mediaError = e;
    });
    const ok = await this.client.request({ type: 'av_join', room });
    if (ok.mode === 'sfu') return this.sfuJoin(room, ok);
    if (mediaError) {
      await this.client.request({ type: 'av_leave', room }).catch(() => {});
      throw mediaError;
    }
    this.av = { room, mode: 'mesh', peers: new Map(), ice: ok.ice_servers, publish: ok.publish };
    for (const peer of ok.peers) {
      const p = this.addAvPeer(peer.session, peer.user);
      if (ok.publish) p.peer.addTracks(this.local);
      else {
        p.peer.pc.addTransceiver('audio', { direction: 'recvonly' });
        p.peer.pc.addTransceiver('video', { direction: 'recvonly' });
      }
      await p.peer.offer();
    }
    this.ui.onAv(this.av);
  }

  addAvPeer(session, user) {
    const av = this.av;
    const entry = { user, stream: null, state: 'new' };
    entry.peer = new Peer(av.room + '/' + session, av.ice,
      this.signalSender({ type: 'signal', room: av.room, to: session }),
      (stream) => {
        entry.stream = stream;
        this.ui.onAv(this.av);
      },
      (state) => {
        entry.state = state;
        this.ui.onAv(this.av);
      });
    av.peers.set(session, entry);
    this.ui.onAv(av);
    return entry;
  }

  onAvPeer(m) {
    if (!this.av || this.av.room !== m.room) return;
    if (this.av.mode === 'sfu') return this.sfuPeer(m);
    if (!m.joined) {
      const p = this.av.peers.get(m.session);
      if (p) p.peer.close();
      this.av.peers.delete(m.session);
      this.ui.onAv(this.av);
    }
    // A newcomer offers to us; its offer creates the peer in onSignal.
  }

  async avLeave() {
    if (!this.av) return;
    const room = this.av.room;
    if (this.av.mode === 'sfu') this.av.sfu.pc.close();
    else for (const p of this.av.peers.values()) p.peer.close();
    this.av = null;
    this.stopMedia();
    this.ui.onAv(null);
    await this.client.request({ type: 'av_leave', room }).catch(() => {});
  }

  // -- SFU: the server is the one peer ---------------------------------------------------------

  async sfuJoin(room, ok) {
    const pc = new RTCPeerConnection({ iceServers: ok.ice_servers || [] });
    const av = {
      room, mode: 'sfu', ice: ok.ice_servers, publish: ok.publish, peers: new Map(), users: new Map(),
      sessions: new Map(ok.peers.map((p) => [p.session, p.user])), offStage: new Set(), speakers: new Set(),
      // `watch`: our own recvonly sections (the server sends nothing on them).
      sfu: { pc, chain: Promise.resolve(), held: [], makingOffer: false, senders: [], watch: new Set(), state: 'new' },
    };
    this.av = av;
    const send = this.signalSender({ type: 'signal', room, to: SFU_PEER });
    av.sfu.send = send;
    pc.onicecandidate = (e) => send({ candidate: e.candidate ? e.candidate.toJSON() : null });
    pc.ontrack = (e) => this.sfuTrack(av, e);
    pc.onconnectionstatechange = () => {
      av.sfu.state = pc.connectionState;
      for (const u of av.users.values()) u.state = pc.connectionState;
      if (this.av === av) this.ui.onAv(av);
    };
    // Connectivity lost for good on our side: restart ICE (a new offer with new credentials),
    // which the server takes within its grace period.
    pc.oniceconnectionstatechange = () => {
      if (pc.iceConnectionState === 'failed' && this.av === av) this.sfuQueue(() => this.sfuRestartIce(av));
    };
    if (ok.publish && this.local) this.sfuPublishTracks(av);
    else {
      // Watch only: recvonly sections, so that the first offer has media sections at all.
      // The camera is not needed until this session may publish (a stage change).
      this.releaseLocal();
      for (const kind of ['audio', 'video']) av.sfu.watch.add(pc.addTransceiver(kind, { direction: 'recvonly' }));
    }
    this.ui.onAv(av);
    await this.sfuQueue(() => this.sfuOffer(av));
    return ok;
  }

  /// Stops the camera and microphone while A/V does not use them.
  releaseLocal() {
    if (!this.local || this.call) return;
    for (const t of this.local.getTracks()) t.stop();
    this.local = null;
  }

  /// Our own tracks as new sendonly sections (never reusing a receiving transceiver); the
  /// camera as three simulcast layers, of which the SFU forwards to each viewer the one its
  /// bandwidth carries.
  sfuPublishTracks(av) {
    for (const t of this.local.getTracks()) {
      const init = { direction: 'sendonly', streams: [this.local] };
      if (t.kind === 'video') init.sendEncodings = SIMULCAST_LAYERS.map((e) => ({ ...e }));
      const tr = av.sfu.pc.addTransceiver(t, init);
      av.sfu.senders.push({ sender: tr.sender, kind: t.kind });
    }
  }

  /// Runs `step` after everything queued on the SFU peer connection before it.
  sfuQueue(step) {
    const s = this.av.sfu;
    s.chain = s.chain.then(step).catch((e) => console.warn('sfu signal', e));
    return s.chain;
  }

  async sfuRestartIce(av) {
    if (this.av !== av || av.sfu.pc.signalingState === 'closed') return;
    av.sfu.pc.restartIce();
    await this.sfuOffer(av);
  }

  async sfuOffer(av) {
    const s = av.sfu;
    if (this.av !== av || s.pc.signalingState === 'closed') return;
    s.makingOffer = true;
    try {
      await s.pc.setLocalDescription(await s.pc.createOffer());
    } finally {
      s.makingOffer = false;
    }
    const d = s.pc.localDescription;
    s.send({ sdp: { type: d.type, sdp: d.sdp } });
  }

  /// The server's side. The client is the impolite peer: an offer of the server that meets
  /// one of ours is ignored (the server voids it on receiving ours and offers again after
  /// answering).
  async sfuApply(data) {
    const av = this.av;
    if (!av || av.mode !== 'sfu') return;
    const s = av.sfu;
    const pc = s.pc;
    if (pc.signalingState === 'closed') return;
    if (data.sdp) {
      if (data.sdp.type === 'offer') {
        if (s.makingOffer || pc.signalingState !== 'stable') return;
        try {
          await pc.setRemoteDescription(data.sdp);
        } catch (e) {
          // An offer we cannot take (the protocol has no way to refuse one): offering
          // ourselves voids it, and the server offers its changes again after answering.
          console.warn('sfu offer refused here, offering instead', e);
          await this.sfuOffer(av);
          return;
        }
        await this.sfuFlushCandidates(s);
        await pc.setLocalDescription(await pc.createAnswer());
        const d = pc.localDescription;
        s.send({ sdp: { type: d.type, sdp: d.sdp } });
      } else {
        if (pc.signalingState !== 'have-local-offer') return;
        await pc.setRemoteDescription(data.sdp);
        await this.sfuFlushCandidates(s);
      }
      this.sfuPrune(av);
    } else if ('candidate' in data) {
      if (!pc.remoteDescription) s.held.push(data.candidate);
      else await this.sfuCandidate(pc, data.candidate);
    }
  }

  async sfuFlushCandidates(s) {
    for (const c of s.held.splice(0)) await this.sfuCandidate(s.pc, c);
  }

  async sfuCandidate(pc, c) {
    if (c && c.candidate) await pc.addIceCandidate(c);
    else await pc.addIceCandidate();
  }

  /// A remote track: its stream id is the publisher's user id (one tile per user).
  sfuTrack(av, e) {
    const user = e.streams[0] ? e.streams[0].id : null;
    if (!user || this.av !== av || av.sfu.watch.has(e.transceiver)) return;
    let u = av.users.get(user);
    if (!u) {
      u = { user, stream: new MediaStream(), state: av.sfu.state };
      av.users.set(user, u);
    }
    for (const old of u.stream.getTracks()) if (old.kind === e.track.kind && old.readyState === 'ended') u.stream.removeTrack(old);
    u.stream.addTrack(e.track);
    e.track.addEventListener('ended', () => this.sfuPrune(av));
    this.sfuShow(av);
  }

  /// Drops the tracks the server stopped (their sections came back with port 0) and the users
  /// left with none.
  sfuPrune(av) {
    if (this.av !== av) return;
    const live = new Set();
    for (const t of av.sfu.pc.getTransceivers()) {
      const d = t.currentDirection;
      if ((d === 'recvonly' || d === 'sendrecv') && t.receiver.track.readyState === 'live') live.add(t.receiver.track.id);
    }
    for (const [user, u] of av.users) {
      for (const t of u.stream.getTracks()) if (!live.has(t.id)) u.stream.removeTrack(t);
      if (!u.stream.getTracks().length) av.users.delete(user);
    }
    this.sfuShow(av);
  }

  /// The tiles: every publisher heard, less those taken off stage.
  sfuShow(av) {
    if (this.av !== av) return;
    av.peers = new Map([...av.users].filter(([user]) => !av.offStage.has(user)));
    this.ui.onAv(av);
  }

  sfuPeer(m) {
    const av = this.av;
    if (m.joined) {
      av.sessions.set(m.session, m.user);
      return;
    }
    av.sessions.delete(m.session);
    // The user's tracks go with the server's next offer; without another session of that
    // user in the room's SFU, the tile goes now.
    if (![...av.sessions.values()].includes(m.user)) {
      av.users.delete(m.user);
      this.sfuShow(av);
    }
  }

  onSpeakers(m) {
    const av = this.av;
    if (!av || av.room !== m.room) return;
    av.speakers = new Set(m.users);
    if (this.ui.onSpeakers) this.ui.onSpeakers(av);
    else this.ui.onAv(av);
  }

  /// A host or ta stopped our audio or video in the SFU: the track is disabled here too.
  onAvMuted(m) {
    const av = this.av;
    if (!av || av.room !== m.room) return;
    const tracks = this.local ? (m.kind === 'audio' ? this.local.getAudioTracks() : this.local.getVideoTracks()) : [];
    // Remember which tracks the server's mute turned off, so that av_unmuted turns back on
    // only those (not one the user had turned off).
    av.mutedTracks = av.mutedTracks || { audio: [], video: [] };
    for (const t of tracks) {
      if (t.enabled) av.mutedTracks[m.kind].push(t);
      t.enabled = false;
    }
    if (this.ui.onAvMuted) this.ui.onAvMuted(m);
  }

  onAvUnmuted(m) {
    const av = this.av;
    if (!av || av.room !== m.room) return;
    const tracks = (av.mutedTracks && av.mutedTracks[m.kind]) || [];
    for (const t of tracks) if (t.readyState === 'live') t.enabled = true;
    if (av.mutedTracks) av.mutedTracks[m.kind] = [];
    if (this.ui.onAvUnmuted) this.ui.onAvUnmuted(m);
  }

  /// Live rooms on the SFU: going on stage starts publishing (new sendonly sections, one
  /// offer; or the paused senders get their tracks back), going off stops sending. Others
  /// taken off stage lose their tile (the server stops forwarding them).
  onStage(m) {
    const av = this.av;
    if (!av || av.mode !== 'sfu' || av.room !== m.room) return;
    // Only a live room ties publishing to the stage (a class room's members always publish).
    const room = this.client.rooms.get(m.room);
    if (!room || !room.info || room.info.kind !== 'live') return;
    const user = m.user && m.user.id;
    const me = this.client.me && this.client.me.user.id;
    if (user !== me) {
      if (m.on) av.offStage.delete(user);
      else av.offStage.add(user);
      this.sfuShow(av);
      return;
    }
    // The host publishes on stage or not.
    if (m.on === av.publish || room.role === 'host') return;
    av.publish = m.on;
    this.sfuQueue(() => (m.on ? this.sfuStartPublishing(av) : this.sfuStopPublishing(av)));
  }

  async sfuStartPublishing(av) {
    if (this.av !== av || !av.publish) return;
    await this.media();
    if (av.sfu.senders.length) {
      // Published before: the sections are there, only the tracks come back.
      for (const s of av.sfu.senders) {
        await s.sender.replaceTrack(this.local.getTracks().find((t) => t.kind === s.kind) || null);
      }
    } else {
      this.sfuPublishTracks(av);
      await this.sfuOffer(av);
    }
    this.ui.onAv(av);
  }

  async sfuStopPublishing(av) {
    if (this.av !== av) return;
    for (const s of av.sfu.senders) await s.sender.replaceTrack(null);
    this.releaseLocal();
    this.ui.onAv(av);
  }

  /// Removed from the room: the server closed our SFU peer connection.
  // The server closed the room's A/V for us (the class ended): we are out of it already, so
  // only our side is torn down (no av_leave).
  // `connection_lost` (the SFU gave up on our peer connection): we are still in the room's
  // A/V, so we join again with a new peer connection (at most once in 30 s, so that a
  // connection that keeps failing ends).
  onAvClosed(m) {
    const av = this.av;
    if (!av || av.room !== m.room) return;
    if (av.mode === 'sfu') av.sfu.pc.close();
    else for (const p of av.peers.values()) p.peer.close();
    this.av = null;
    const now = Date.now();
    if (m.reason === 'connection_lost' && !(this.lastRejoin > now - 30000)) {
      this.lastRejoin = now;
      this.ui.onAv(null);
      this.avJoin(m.room).catch((e) => {
        this.stopMedia();
        if (this.ui.onAvClosed) this.ui.onAvClosed(m);
        console.warn('A/V re-join failed', e);
      });
      return;
    }
    this.stopMedia();
    this.ui.onAv(null);
    if (this.ui.onAvClosed) this.ui.onAvClosed(m);
  }

  onKicked(m) {
    const av = this.av;
    if (!av || av.mode !== 'sfu' || av.room !== m.room) return;
    av.sfu.pc.close();
    this.av = null;
    this.stopMedia();
    this.ui.onAv(null);
  }
}
