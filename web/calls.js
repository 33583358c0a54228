// calls.js owns the web client's WebRTC: the 1v1 call (call / call_incoming / accept /
// reject / hangup, mute, camera off, the call timer's start) and the small-class mesh
// (av_join, av_peer): one RTCPeerConnection per call or per A/V peer, trickle ICE through
// `signal`, remote candidates held until the remote description is set (the approach of
// tests/browser/page/studyhall-rtc.js). No DOM beyond the <video> elements it is handed.

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

/// Calls and A/V for one signed-in client. `ui` gets callbacks: onCall(state), onAv(state).
export class Calls {
  constructor(client, ui) {
    this.client = client;
    this.ui = ui;
    this.local = null;
    this.call = null; // {id, peerUser, peerName, state, startedAt, incoming, peer, media}
    this.early = new Map(); // key -> [signal data] before the peer existed
    this.av = null; // {room, peers: Map(session -> {peer, user, stream})}
    client.on('call_incoming', (m) => this.onIncoming(m));
    client.on('call_state', (m) => this.onCallState(m));
    client.on('call_ended', (m) => this.onEnded(m));
    client.on('signal', (m) => this.onSignal(m));
    client.on('av_peer', (m) => this.onAvPeer(m));
  }

  async media(kinds = { audio: true, video: true }) {
    if (this.local) return this.local;
    const video = kinds.video ? { width: 640, height: 480 } : false;
    this.local = await navigator.mediaDevices.getUserMedia({ audio: !!kinds.audio, video });
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
    let p = this.av.peers.get(m.from.session);
    if (!p) p = this.addAvPeer(m.from.session, m.from.user);
    p.peer.handle(m.data, this.av.publish ? this.local : null);
  }

  // -- small-class mesh --------------------------------------------------------------------

  async avJoin(room) {
    if (this.av) return;
    await this.media();
    const ok = await this.client.request({ type: 'av_join', room });
    this.av = { room, peers: new Map(), ice: ok.ice_servers, publish: ok.publish };
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
    for (const p of this.av.peers.values()) p.peer.close();
    this.av = null;
    this.stopMedia();
    this.ui.onAv(null);
    await this.client.request({ type: 'av_leave', room }).catch(() => {});
  }
}
