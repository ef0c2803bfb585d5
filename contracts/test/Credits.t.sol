// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {Credits} from "../src/Credits.sol";
import {NectarFixture} from "./utils/NectarFixture.sol";

contract CreditsTest is NectarFixture {
    event FaucetMinted(address indexed caller, address indexed to, uint256 amount);

    function test_Metadata() public view {
        assertEq(credits.name(), "Nectar Credits", "name");
        assertEq(credits.symbol(), "NCR", "symbol");
        assertEq(uint256(credits.decimals()), 18, "decimals");
    }

    function test_FaucetMints() public {
        vm.expectEmit(address(credits));
        emit FaucetMinted(address(this), client, 5 ether);
        credits.faucet(client, 5 ether);
        assertEq(credits.balanceOf(client), 5 ether, "balance");
        assertEq(credits.totalSupply(), 5 ether, "supply");
    }

    function testFuzz_FaucetUpToCap(uint256 amount) public {
        amount = bound(amount, 0, FAUCET_CAP);
        credits.faucet(client, amount);
        assertEq(credits.balanceOf(client), amount, "balance");
    }

    function testFuzz_RevertWhen_FaucetAboveCap(uint256 amount) public {
        amount = bound(amount, FAUCET_CAP + 1, type(uint256).max);
        vm.expectRevert(abi.encodeWithSelector(Credits.FaucetCapExceeded.selector, amount, FAUCET_CAP));
        credits.faucet(client, amount);
    }

    function test_RevertWhen_FaucetDisabled() public {
        Credits closed = new Credits(owner, 0);
        vm.expectRevert(Credits.FaucetDisabled.selector);
        closed.faucet(client, 1);
    }

    function test_OwnerMints() public {
        _mint(client, 3 ether);
        assertEq(credits.balanceOf(client), 3 ether, "balance");
    }

    function test_RevertWhen_MintByNonOwner() public {
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, client));
        vm.prank(client);
        credits.mint(client, 1);
    }

    function test_PermitSetsAllowance() public {
        bytes32 typehash =
            keccak256("Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)");
        uint256 deadline = block.timestamp + 1 hours;
        bytes32 structHash = keccak256(abi.encode(typehash, client, address(escrow), 10 ether, 0, deadline));
        bytes32 digest = keccak256(abi.encodePacked("\x19\x01", credits.DOMAIN_SEPARATOR(), structHash));
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(CLIENT_PK, digest);
        credits.permit(client, address(escrow), 10 ether, deadline, v, r, s);
        assertEq(credits.allowance(client, address(escrow)), 10 ether, "allowance");
        assertEq(credits.nonces(client), 1, "nonce");
    }
}
